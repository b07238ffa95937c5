"""Validation loss over masked batches and the logged throughput.

The validation loss of batches with a loss mask is the set's summed NLL over
its scored tokens, computed here in numpy from the model's logits. The
throughput of a log record covers the training steps of its own interval
only: a fake clock makes validation take 100,000 s, which must not show.
"""

import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import models
from moe_jax import run_log
from moe_jax import scoring
from moe_jax import state as state_lib
from moe_jax import train as train_lib
from tests.train.test_train_step import tiny


# ----------------------------------------------------------------------------
# Validation loss: token-weighted over batches.

def test_masked_validation_loss_is_summed_nll_over_scored_tokens():
  config = tiny('smoe_154m')
  model = models.build(config)
  optimizer, _ = state_lib.make_optimizer(config.train)
  state = jax.jit(lambda k: train_lib.nn.unbox(state_lib.init_state(
      k, model=model, optimizer=optimizer, config=config)))(
          jax.random.key(0))
  rng = np.random.default_rng(0)
  batches = []
  # One scored token in the first batch, all 64 in the second: a mean of
  # the two batch means would weigh that one token like 64.
  for scored in (1, 64):
    tokens = rng.integers(0, config.model.vocab_size, (4, 17))
    mask = np.zeros((4, 16), np.float32)
    mask.reshape(-1)[rng.permutation(64)[:scored]] = 1.0
    batches.append({'inputs': jnp.asarray(tokens[:, :-1], jnp.int32),
                    'targets': jnp.asarray(tokens[:, 1:], jnp.int32),
                    scoring.LOSS_MASK: jnp.asarray(mask)})
  eval_fn = jax.jit(functools.partial(scoring.eval_step, model=model))
  got = scoring.evaluate(
      lambda b: eval_fn(state.params, state.router_state, state.step, b),
      batches)

  # Naive reference: float64 log-softmax of each masked position.
  nll_sum = correct_sum = weight = 0.0
  for b in batches:
    logits = np.asarray(model.apply({'params': state.params}, b['inputs'])[0],
                        np.float64)                              # [B, S, V]
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + (
        logits.max(-1))
    targets = np.asarray(b['targets'])
    nll = logz - np.take_along_axis(logits, targets[..., None], -1)[..., 0]
    correct = logits.argmax(-1) == targets
    mask = np.asarray(b[scoring.LOSS_MASK]) > 0
    nll_sum += nll[mask].sum()
    correct_sum += correct[mask].sum()
    weight += mask.sum()
  assert weight == 65
  np.testing.assert_allclose(got['loss'], nll_sum / weight, rtol=1e-5)
  np.testing.assert_allclose(got['ppl'], np.exp(nll_sum / weight), rtol=1e-5)
  np.testing.assert_allclose(got['accuracy'], correct_sum / weight,
                             atol=1e-7)
  assert got['batches'] == 2


def test_equal_batches_give_the_mean_of_their_means():
  # Without a mask every batch has B*S tokens: the token-weighted mean is
  # the plain mean of the batch means, bit for bit (resumed runs compare
  # validation losses exactly).
  outs = [{'ce': np.float32(c), 'accuracy': np.float32(a),
           'tokens': np.float32(512)}
          for c, a in [(2.1, 0.3), (3.7, 0.25), (1.9, 0.5)]]
  got = scoring.mean_over_batches(outs)
  assert got['loss'] == (float(np.float32(2.1)) + float(np.float32(3.7)) +
                         float(np.float32(1.9))) / 3
  with pytest.raises(ValueError, match='score no token'):
    scoring.mean_over_batches([{'ce': 0.0, 'accuracy': 0.0, 'tokens': 0.0}])


# ----------------------------------------------------------------------------
# Throughput per logging interval.

class _Log:
  def __init__(self):
    self.records, self.lines = {}, []

  def write(self, split, step, record):
    self.records[step] = dict(record)

  def progress(self, step, record, rate, eta):
    self.lines.append((step, rate, eta))


def test_writer_rates_cover_their_interval_and_skip_pauses(monkeypatch):
  clock = [0.0]
  monkeypatch.setattr(train_lib, 'time',
                      types.SimpleNamespace(perf_counter=lambda: clock[0]))
  log = _Log()
  writer = train_lib._MetricsWriter(
      log, None, tokens_per_step=100, samples_per_step=4,
      flops_per_token=10.0, peak=1e4, stop=10)

  def step(n, seconds):
    clock[0] += seconds
    writer.add(n, {'loss': np.float32(1.0), 'grad_norm': np.float32(1.0),
                   'param_norm': np.float32(1.0)})

  step(1, 30.0)      # compilation: the timer starts at its end, t = 30
  step(2, 2.0)
  step(3, 2.0)
  writer.flush(progress=True)                  # 2 steps in 4 s
  with writer.paused():
    clock[0] += 1000.0                         # validation
  step(4, 2.0)
  with writer.paused():
    clock[0] += 500.0                          # a checkpoint save
  step(5, 2.0)
  writer.flush(progress=True)                  # 2 steps in 4 s of training
  step(6, 8.0)
  writer.flush(progress=True)                  # 1 step in 8 s
  rates = {s: log.records[s]['tokens_per_s'] for s in (3, 5, 6)}
  assert rates == {3: 50.0, 5: 50.0, 6: 12.5}
  assert log.records[5]['samples_per_s'] == 2.0
  assert log.records[5]['mfu'] == pytest.approx(
      10.0 * 50.0 / (1e4 * jax.device_count()))
  assert 'tokens_per_s' not in log.records[4]
  # ETA from the interval's own rate: 5 steps left at 2 s, 4 left at 8 s.
  assert log.lines[1:] == [(5, 50.0, 10.0), (6, 12.5, 32.0)]


def test_logged_throughput_excludes_validation(monkeypatch, tmp_path):
  # The real loop: validation at steps 2 and 4 takes 100,000 s on a fake
  # clock. Averaged since the first step, the rate at steps 4 and 6 would be
  # under 2 x 128 tokens / 100,000 s = 0.003 tokens/s.
  offset = [0.0]
  real_clock = train_lib.time.perf_counter
  monkeypatch.setattr(train_lib, 'time', types.SimpleNamespace(
      perf_counter=lambda: real_clock() + offset[0]))
  real_evaluate = scoring.evaluate

  def slow_evaluate(*args, **kwargs):
    offset[0] += 1e5
    return real_evaluate(*args, **kwargs)

  monkeypatch.setattr(scoring, 'evaluate', slow_evaluate)
  config = tiny('smoe_154m', **{
      'train.global_batch': 8,      # the 8 CPU devices' batch shards
      'train.steps': 6, 'train.log_every': 2, 'train.eval_every': 2,
      'train.checkpoint_every': 100, 'data.synthetic.num_docs': 400})
  train_lib.train_and_evaluate(config, str(tmp_path))
  assert offset[0] == 3e5
  frame = run_log.read_metrics(str(tmp_path))
  rates = dict(zip(frame['step'], frame['tokens_per_s']))
  for s in (4, 6):
    # 128 tokens per step; a CPU step of the tiny model takes well under 1 s.
    assert rates[s] > 50.0, (s, rates)
