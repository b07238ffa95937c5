"""The pieces of moe_jax/train.py against hand-computed values.

Each expected number is computed here from the formulas of algorithms.md
(§6.2 schedule, §3.8 DeepSeek-V3 bias, §3.3 XMoE norms, §3.11 ReMoE λ), not
read back from the code under test.
"""

import functools
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import config_lib
from moe_jax import flops as flops_lib
from moe_jax import models
from moe_jax import scoring
from moe_jax import state as state_lib
from moe_jax import train as train_lib
from moe_jax.models import decoder
from moe_jax.moe import router as router_lib

CONFIGS = pathlib.Path(__file__).resolve().parents[2] / 'configs'


def tiny(name: str, **overrides):
  config = config_lib.load_config(f'{CONFIGS / name}.py:tiny')
  config.train.seq_len = 16
  config.train.global_batch = 4
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split('.')
    for parent in parents:
      node = node[parent]
    node[leaf] = value
  return config


def one_step(config, batch_seed=0):
  """(state before, state after, metrics, batch) of one train step."""
  model = models.build(config)
  optimizer, schedule = state_lib.make_optimizer(config.train)
  settings = train_lib.StepSettings.from_config(config, model)
  state = jax.jit(lambda k: train_lib.nn.unbox(state_lib.init_state(
      k, model=model, optimizer=optimizer, config=config)))(
          jax.random.key(config.train.seed))
  rng = np.random.default_rng(batch_seed)
  tokens = rng.integers(0, config.model.vocab_size,
                        (config.train.global_batch, config.train.seq_len + 1))
  batch = {'inputs': jnp.asarray(tokens[:, :-1], jnp.int32),
           'targets': jnp.asarray(tokens[:, 1:], jnp.int32)}
  step = jax.jit(functools.partial(
      train_lib.train_step, model=model, optimizer=optimizer,
      schedule=schedule, settings=settings))
  new_state, metrics = step(state, batch)
  return state, new_state, metrics, batch, model


# ----------------------------------------------------------------------------
# Schedule (algorithms.md §6.2).

def libmoe_lr(step, *, lr, warmup, t_max, floor=0.1):
  """LibMoE: lr·step/warmup, then cosine at (step - warmup), period t_max."""
  if step < warmup:
    return lr * step / warmup
  t = step - warmup
  return floor * lr + (lr - floor * lr) * 0.5 * (1 + math.cos(math.pi * t /
                                                              t_max))


@pytest.mark.parametrize('size', ['154m', '660m'])
def test_schedule_matches_libmoe(size):
  config = config_lib.load_config(f'{CONFIGS}/smoe_{size}.py')
  schedule = state_lib.learning_rate_schedule(config.train)
  warmup, t_max = config.train.warmup_steps, config.train.steps
  assert warmup == (0 if size == '154m' else 4000)
  for step in [0, 1, 2000, 4000, 4001, 50_000, 99_999, 100_000, 396_000]:
    if step > config.train.steps:
      continue
    expected = libmoe_lr(step, lr=2.5e-4, warmup=warmup, t_max=t_max)
    # optax's warmup computes peak - peak·(1 - t/w) in float32: absolute
    # error up to float32 eps x peak.
    np.testing.assert_allclose(float(schedule(step)), expected, rtol=1e-5,
                               atol=2.5e-4 * 2e-7)


# ----------------------------------------------------------------------------
# Aux losses and λ.

def test_weighted_aux_loss_by_hand():
  losses = {'balance': jnp.array([1.0, 2.0, 3.0]),
            'remoe_l1': jnp.array([10.0, 20.0, 30.0])}
  lam = jnp.array([0.5, 0.5, 2.0])
  coefficients = {'balance': 0.01, 'remoe_l1': 1.0}
  scales = {'remoe_l1': lam}
  total = train_lib.weighted_aux_loss(losses, coefficients, 'sum', scales)
  # 0.01 * 6 + (5 + 10 + 60)
  np.testing.assert_allclose(float(total), 0.06 + 75.0, rtol=1e-6)
  mean = train_lib.weighted_aux_loss(losses, coefficients, 'mean', scales)
  np.testing.assert_allclose(float(mean), 0.02 + 25.0, rtol=1e-6)


def _remoe_cfg(libmoe: bool):
  # top_k / E = 1 / 4: the sparsity target is 0.75.
  return router_lib.make_config('remoe', num_experts=8, top_k=2, d_model=4,
                                parity={'remoe_libmoe': libmoe})


def test_remoe_lambda_update_paper_and_libmoe():
  hook = router_lib.ROUTERS['remoe'].step_hook
  options = {'lambda0': 1e-8, 'alpha': 1.2}
  update = lambda lam, s, libmoe: np.asarray(hook.update(
      {'lambda': lam}, {'remoe_sparsity': s}, _remoe_cfg(libmoe),
      options)['lambda'])
  lam = hook.init(_remoe_cfg(False), 3, options)['lambda']
  np.testing.assert_allclose(np.asarray(lam), 1e-8, rtol=1e-6)
  # Paper: the mean sparsity decides for all layers; equality divides.
  up = update(lam, jnp.array([0.5, 0.6, 0.7]), False)
  np.testing.assert_allclose(up, 1.2e-8, rtol=1e-6)
  eq = update(lam, jnp.array([0.75, 0.75, 0.75]), False)
  np.testing.assert_allclose(eq, 1e-8 / 1.2, rtol=1e-6)
  # LibMoE parity: per layer, clamped to [1e-6, 1e2].
  out = update(jnp.array([1e-2, 1e-6, 99.0]), jnp.array([0.9, 0.9, 0.1]),
               True)
  np.testing.assert_allclose(out, [1e-2 / 1.2, 1e-6, 100.0], rtol=1e-6)
  # The L1 loss of layer l is scaled by λ_l.
  scales = hook.loss_scales({'lambda': jnp.array([1.0, 2.0, 3.0])})
  np.testing.assert_allclose(np.asarray(scales['remoe_l1']), [1, 2, 3])


def test_cross_entropy_by_hand():
  logits = jnp.log(jnp.array([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]]]))
  targets = jnp.array([[1, 1]])
  ce, accuracy = scoring.token_cross_entropy(logits, targets)
  np.testing.assert_allclose(float(ce), -(math.log(0.25) + math.log(0.8)) / 2,
                             rtol=1e-6)
  assert float(accuracy) == 0.5


# ----------------------------------------------------------------------------
# Whole steps.

def test_step_decreases_loss_on_a_repeated_batch():
  config = tiny('smoe_154m')
  _, state, metrics, batch, model = one_step(config)
  logits, _ = jax.jit(model.apply)({'params': state.params}, batch['inputs'])
  after, _ = scoring.token_cross_entropy(logits, batch['targets'])
  assert float(after) < float(metrics['ce'])
  assert int(state.step) == 1
  assert np.asarray(metrics['max_mean_load']).shape == (config.model.num_layers,)


def test_grad_accumulation_matches_one_big_batch():
  # CE and the per-sequence balance loss are means over sequences, so two
  # micro-batches of 2 give the gradient of one batch of 4. Adam's first
  # update is lr·g/(|g| + eps), ~lr·sign(g), which turns float rounding of a
  # near-zero gradient into an O(lr) difference; eps = 1 makes the update
  # ~lr·g, so parameters compare gradients.
  _, one, m1, _, _ = one_step(tiny('smoe_154m', **{'train.eps': 1.0}))
  _, two, m2, _, _ = one_step(tiny('smoe_154m', **{'train.eps': 1.0,
                                                   'train.grad_accum': 2}))
  np.testing.assert_allclose(float(m1['loss']), float(m2['loss']), rtol=1e-5)
  np.testing.assert_allclose(float(m1['grad_norm']), float(m2['grad_norm']),
                             rtol=1e-4)
  for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(two.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-8)


def test_deepseek_v3_bias_follows_expert_counts():
  config = tiny('deepseek_v3_154m')
  gamma = config.moe.router_options.bias_update_rate
  before, after, _, batch, model = one_step(config)
  # Independent count: the selections of a forward with the pre-step params.
  forward = jax.jit(functools.partial(model.apply, train=True, step=0))
  _, auxes = forward({'params': before.params,
                      'router_state': before.router_state}, batch['inputs'])
  for i, aux in enumerate(auxes):
    counts = np.asarray(aux['metrics']['expert_counts'])
    expected = gamma * np.sign(counts.mean() - counts)
    bias = after.router_state[f'layer_{i}']['moe']['router']['router']['bias']
    np.testing.assert_allclose(np.asarray(bias), expected, atol=1e-9)
    assert np.any(expected != 0)


def test_xmoe_embeddings_projected_after_the_update():
  config = tiny('xmoe_154m')
  _, after, _, _, _ = one_step(config)
  norm = config_lib.layer_lib.MoEBlock(
      **decoder.ffn_kwargs(config)).router_config().xmoe_embed_norm
  for i in range(config.model.num_layers):
    embed = after.params[f'layer_{i}']['moe']['router']['router']['embed']
    norms = np.linalg.norm(np.asarray(embed), axis=0)
    # One norm per expert embedding, whichever axis holds the experts.
    if norms.shape[0] != config.moe.num_experts:
      norms = np.linalg.norm(np.asarray(embed), axis=1)
    np.testing.assert_allclose(norms, norm, rtol=1e-5)


def test_remoe_lambda_moves_once_per_step():
  config = tiny('remoe_154m')
  _, after, metrics, _, _ = one_step(config)
  lam = np.asarray(after.router_hook['lambda'])
  target = 1 - config.moe.top_k / config.moe.num_experts
  sparsity = float(metrics['remoe_sparsity'])
  factor = 1.2 if sparsity < target else 1 / 1.2
  np.testing.assert_allclose(lam, 1e-8 * factor, rtol=1e-6)


def test_train_flops_of_smoe_154m_by_hand():
  config = config_lib.load_config(f'{CONFIGS}/smoe_154m.py')
  # Per layer: attention 4 * 512 * 328, router 512 * 66, 8 experts of
  # 2 * 512 * 128; plus the output layer 512 * 8000.
  per_layer = 4 * 512 * 328 + 512 * 66 + 8 * 2 * 512 * 128
  assert per_layer == 1_754_112
  active = 16 * per_layer + 512 * 8000
  assert flops_lib.active_matmul_params(config) == active == 32_161_792
  attention = 12 * 16 * 4 * 82 * 1024
  assert flops_lib.train_flops_per_token(config) == 6 * active + attention
  assert flops_lib.peak_flops('NVIDIA H100 80GB HBM3') == 989e12
  assert flops_lib.peak_flops('cpu') is None


@pytest.mark.parametrize('name', ['smoe_154m', 'deepseek_v3_154m'])
def test_load_metrics_do_not_depend_on_grad_accum(name):
  # Routing of a token does not depend on its batch, so the step's expert
  # counts are those of one forward over the whole batch whatever
  # train.grad_accum; the load metrics are computed here, in numpy, from
  # those counts (§9: max / mean count, std / mean, experts never chosen).
  # 8 sequences of 4 tokens: a micro-batch of 2 leaves experts unchosen
  # that the whole batch uses, so per-micro-batch metrics would differ.
  overrides = {'train.global_batch': 8, 'train.seq_len': 4}
  metrics = {}
  for accum in (1, 2, 4):
    before, _, m, batch, model = one_step(
        tiny(name, **overrides, **{'train.grad_accum': accum}))
    metrics[accum] = {k: np.asarray(m[k]) for k in
                      ('max_mean_load', 'load_cv', 'dead_experts')}
  _, auxes = jax.jit(functools.partial(model.apply, train=True, step=0))(
      {'params': before.params, 'router_state': before.router_state},
      batch['inputs'])
  counts = np.stack([np.asarray(a['metrics']['expert_counts'], np.float64)
                     for a in auxes])                              # [L, E']
  mean = counts.sum(-1) / counts.shape[-1]
  expected = {'max_mean_load': counts.max(-1) / mean,
              'load_cv': counts.std(-1) / mean,
              # Logged as the mean over layers.
              'dead_experts': np.mean((counts == 0).sum(-1))}
  for accum, got in metrics.items():
    for key, value in expected.items():
      np.testing.assert_allclose(got[key], value, rtol=1e-6,
                                 err_msg=f'{key}, grad_accum={accum}')
