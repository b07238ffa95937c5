"""The batched scorer (moe_jax/loglikelihood.py) against a naive one.

The naive reference runs one request at a time through the model on exactly
its own tokens (no padding, no other rows, one device) and sums
log_softmax by hand; the batched scorer sorts, buckets, pads and shards the
same requests over the 8 host devices. They must agree to 1e-5 (float32).
"""

import pathlib

import flax.linen as nn
import jax
import numpy as np
import pytest

from moe_jax import config_lib
from moe_jax import loglikelihood
from moe_jax import models
from moe_jax import state as state_lib

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / 'configs'
MAX_LEN = 24


@pytest.fixture(scope='module')
def tiny_model():
  config = config_lib.load_config(f'{CONFIGS}/smoe_154m.py:tiny')
  model = models.build(config)
  variables = state_lib.init_variables(jax.random.key(3), model=model,
                                       seq_len=8)
  variables = nn.unbox(variables)
  # One compile per request length (the naive reference is unpadded).
  apply = jax.jit(lambda v, tokens: model.apply(v, tokens, train=False)[0])
  return apply, model, variables, config.model.vocab_size


def naive_score(apply, variables, request, max_len):
  """log p of the continuation and of the predicted context tokens, and the
  argmax ids, from one unpadded forward of the request's own window."""
  tokens = list(request.context + request.continuation)[-(max_len + 1):]
  logits = apply(variables, np.asarray([tokens[:-1]], np.int32))
  logits = np.asarray(logits[0], np.float64)
  log_probs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True))
                              .sum(-1, keepdims=True)) - logits.max(
                                  -1, keepdims=True)
  targets = tokens[1:]
  per_token = log_probs[np.arange(len(targets)), targets]
  n = min(len(request.continuation), len(targets))
  return (per_token[-n:].sum(), per_token[:-n].sum(),
          tuple(int(t) for t in logits.argmax(-1)[-n:]))


def random_requests(vocab, seed=0):
  rng = np.random.default_rng(seed)
  requests = []
  # Lengths span several buckets (8, 16, 24) and one request longer than
  # the context (left truncation), plus a duplicate.
  for context_len, cont_len in [(1, 1), (3, 5), (9, 2), (15, 6), (2, 20),
                                (30, 4), (40, 30), (1, 3)]:
    requests.append(loglikelihood.Request(
        tuple(int(t) for t in rng.integers(0, vocab, context_len)),
        tuple(int(t) for t in rng.integers(0, vocab, cont_len))))
  requests.append(requests[3])
  return requests


def test_batched_equals_naive(tiny_model):
  apply, model, variables, vocab = tiny_model
  requests = random_requests(vocab)
  scorer = loglikelihood.Scorer(
      model, variables['params'], variables.get('router_state', {}),
      max_len=MAX_LEN, batch_size=3, min_bucket=8, progress=False)
  assert scorer.batch_size == 8          # rounded up to the 8 devices
  assert scorer.buckets == (8, 16, 24)
  scores = scorer.loglikelihood(requests)
  assert len(scores) == len(requests)
  for request, score in zip(requests, scores):
    logprob, context_logprob, greedy = naive_score(apply, variables, request,
                                                   MAX_LEN)
    np.testing.assert_allclose(score.logprob, logprob, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(score.context_logprob, context_logprob,
                               rtol=1e-5, atol=1e-5)
    assert score.greedy_tokens == greedy
    assert score.is_greedy == (greedy == request.continuation[-len(greedy):])
  # The 40 + 30 token request keeps its last 24 continuation tokens (the
  # window is 25 ids); the 2 + 20 request keeps all 20.
  assert scores[6].num_tokens == MAX_LEN and scores[4].num_tokens == 20


def test_greedy_generation_equals_stepwise_argmax(tiny_model):
  apply, model, variables, vocab = tiny_model
  scorer = loglikelihood.Scorer(
      model, variables['params'], variables.get('router_state', {}),
      max_len=MAX_LEN, batch_size=8, min_bucket=8, progress=False)
  rng = np.random.default_rng(1)
  contexts = [list(rng.integers(0, vocab, n)) for n in (2, 30)]
  generated = scorer.generate(contexts, max_new_tokens=3)
  for context, out in zip(contexts, generated):
    # Naive: append the argmax of an unpadded forward, three times.
    tokens = [int(t) for t in context][-(MAX_LEN - 3):]
    expected = []
    for _ in range(3):
      logits = apply(variables, np.asarray([tokens], np.int32))
      expected.append(int(np.argmax(logits[0, -1])))
      tokens.append(expected[-1])
    assert out == expected
  # A stop rule ends a row early.
  first = generated[0][0]
  assert scorer.generate(contexts[:1], max_new_tokens=3,
                         stop=lambda ids: ids[-1] == first) == [[first]]


def test_bad_requests_are_named():
  assert loglikelihood.bucket_lengths(100, 32) == (32, 64, 100)
  with pytest.raises(ValueError, match='continuation'):
    loglikelihood._window(loglikelihood.Request((1,), ()), 8)
  with pytest.raises(ValueError, match='prefix'):
    loglikelihood._window(loglikelihood.Request((), (5,)), 8)


def test_capacity_factor_scores_do_not_depend_on_the_batch(tiny_model,
                                                           monkeypatch):
  """moe.capacity_factor set: the scorer runs the layers dropless, so each
  request scores the same alone (one request + padding rows) as in a full
  batch of 8, and equals the naive unpadded forward of the capacity-free
  model (the same parameters)."""
  apply, _, variables, vocab = tiny_model
  config = config_lib.load_config(f'{CONFIGS}/smoe_154m.py:tiny')
  config.moe.capacity_factor = 0.5
  model = models.build(config)
  assert model.ffn['capacity_factor'] == 0.5
  assert loglikelihood.dropless_model(model).ffn['capacity_factor'] is None
  requests = random_requests(vocab)[:8]

  def scores(batch_size, alone):
    scorer = loglikelihood.Scorer(
        model, variables['params'], variables.get('router_state', {}),
        max_len=MAX_LEN, batch_size=batch_size, min_bucket=8,
        progress=False)
    if alone:
      return [scorer.loglikelihood([r])[0] for r in requests]
    return scorer.loglikelihood(requests)

  together, alone = scores(8, False), scores(1, True)
  for request, a, b in zip(requests, together, alone):
    np.testing.assert_allclose(a.logprob, b.logprob, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(a.context_logprob, b.context_logprob,
                               rtol=1e-5, atol=1e-5)
    logprob, context_logprob, greedy = naive_score(apply, variables, request,
                                                   MAX_LEN)
    np.testing.assert_allclose(a.logprob, logprob, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(a.context_logprob, context_logprob,
                               rtol=1e-5, atol=1e-5)
  # The check has teeth: with the capacity kept, the same two ways differ.
  monkeypatch.setattr(loglikelihood, 'dropless_model', lambda m: m)
  together, alone = scores(8, False), scores(1, True)
  assert max(abs(a.logprob - b.logprob)
             for a, b in zip(together, alone)) > 1e-3
