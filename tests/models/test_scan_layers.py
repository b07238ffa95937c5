"""train.layer_loop='scan' computes what the unrolled loop computes.

The scanned decoder holds its layers' parameters stacked on a leading [L]
axis under decoder.SCANNED; with the unrolled model's parameters stacked
(decoder.stack_layer_params) it must give the same loss, gradients (float32,
1e-6) and train step, with and without remat. The backend is ragged_dot and
every model compiles once: the file runs in about 30 s on 2 CPU cores. Routers: smoe, deepseek_v3
(router state and the post-update through the indexed router paths) and
moe_plus_plus (prev_logits carried between layers).

RNG: under scan each layer's 'router' rng is split from the stream, not
folded from the layer's name, so a router that draws noise (MoE++ expert
dropout) draws different noise than unrolled. The dropout case is compared
in eval mode (no draw); in train mode it is only checked to run, finite
and deterministic. The routers above draw nothing in train mode.

Tiny model (d 64, L 2), B 2, S 16.
"""

import functools
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from moe_jax import config_lib
from moe_jax import models
from moe_jax import state as state_lib
from moe_jax import train as train_lib
from moe_jax.models import decoder

B, S = 2, 16
CONFIGS = pathlib.Path(__file__).resolve().parents[2] / 'configs'


def _config(router: str, **router_options):
  config = config_lib.load_config(f'{CONFIGS}/{router}_154m.py:tiny')
  config.train.dtype = 'float32'
  config.train.seq_len = S
  config.train.global_batch = 2 * B
  # The backend that compiles fastest on CPU (all backends agree, see
  # tests/moe); the tests count compiles, not FLOPs.
  config.moe.backend = 'ragged_dot'
  with config.unlocked():
    for name, value in router_options.items():
      config.moe.router_options[name] = value
  return config


def _tokens(vocab: int, rows: int = B):
  rng = np.random.default_rng(0)
  return jnp.asarray(rng.integers(0, vocab, (rows, S + 1)), jnp.int32)


# MoE++ runs with expert dropout, compared in eval mode (see the top).
OPTIONS = {'smoe': {}, 'deepseek_v3': {},
           'moe_plus_plus': {'expert_dropout': 0.1}}


@functools.cache
def _built(router: str):
  """(config, unrolled model, its variables): one init compile per router."""
  config = _config(router, **OPTIONS[router])
  model = models.build(config)
  tokens = _tokens(config.model.vocab_size)
  variables = nn.unbox(jax.jit(model.init)(jax.random.key(0), tokens[:, :-1]))
  return config, model, variables


def _loss(params, others, tokens, *, model, train):
  logits, auxes = model.apply({**others, 'params': params}, tokens[:, :-1],
                              train=train, step=jnp.int32(3),
                              rngs={'router': jax.random.key(7)})
  logp = jax.nn.log_softmax(logits)
  ce = -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))
  aux = sum(jnp.sum(v) for a in auxes for v in a['losses'].values())
  return ce + 0.01 * aux, auxes


def _stack(variables, num_layers):
  return {name: decoder.stack_layer_params(tree, num_layers)
          for name, tree in variables.items()}


def _assert_trees_close(got, want, tol=1e-6):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(want),
                          jax.tree.leaves(got)):
    np.testing.assert_allclose(b, a, rtol=tol, atol=tol,
                               err_msg=jax.tree_util.keystr(path))


def test_stack_unstack_round_trip():
  config, model, variables = _built('deepseek_v3')   # params + router_state
  L = config.model.num_layers
  for tree in variables.values():
    stacked = decoder.stack_layer_params(tree, L)
    assert decoder.SCANNED in stacked and 'layer_0' not in stacked
    back = decoder.unstack_layer_params(stacked, L)
    assert jax.tree.structure(back) == jax.tree.structure(dict(tree))
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(dict(tree))):
      np.testing.assert_array_equal(a, b)
  # The stacked layout is the scanned model's variable tree.
  scan = model.clone(layer_loop='scan')
  shapes = jax.eval_shape(scan.init, jax.random.key(0), _tokens(512)[:, :-1])
  assert jax.tree.map(jnp.shape, nn.unbox(shapes)) == jax.tree.map(
      jnp.shape, _stack(variables, L))


def test_stacked_axis_is_logically_named():
  model = models.build(_config('smoe')).clone(layer_loop='scan')
  shapes = jax.eval_shape(model.init, jax.random.key(0), _tokens(512)[:, :-1])
  kernel = shapes['params'][decoder.SCANNED]['attention']['query']['kernel']
  assert kernel.names == (decoder.SCANNED, 'embed', 'heads')


# DeepSeek-V3's gradients are compared by test_train_step_matches_unrolled.
@pytest.mark.parametrize('router,remat', [
    ('smoe', 'none'),
    # MoE++ carries prev_logits through the scan; with remat too.
    ('moe_plus_plus', 'full')])
def test_scan_matches_unrolled(router, remat):
  config, model, variables = _built(router)
  # Expert dropout draws from the router rng: MoE++ in eval mode.
  train = router != 'moe_plus_plus'
  tokens = _tokens(config.model.vocab_size)
  L = config.model.num_layers

  def run(m, v):
    fn = jax.jit(jax.value_and_grad(
        functools.partial(_loss, model=m, train=train), has_aux=True))
    return fn(v['params'], {k: x for k, x in v.items() if k != 'params'},
              tokens)

  (loss, auxes), grads = run(model, variables)
  scan = model.clone(layer_loop='scan', remat=remat)
  (got_loss, got_auxes), got_grads = run(scan, _stack(variables, L))
  np.testing.assert_allclose(got_loss, loss, rtol=1e-6, atol=1e-6)
  _assert_trees_close(got_grads, decoder.stack_layer_params(grads, L))
  # The same per-layer aux list (losses, metrics, routing, logits).
  assert len(got_auxes) == len(auxes) == L
  _assert_trees_close(got_auxes, auxes)


def test_scan_with_dropout_runs_in_train_mode():
  config, model, variables = _built('moe_plus_plus')
  scan = model.clone(layer_loop='scan')
  tokens = _tokens(config.model.vocab_size)
  fn = jax.jit(functools.partial(_loss, model=scan, train=True))
  params = decoder.stack_layer_params(variables['params'],
                                      config.model.num_layers)
  first, _ = fn(params, {}, tokens)
  again, _ = fn(params, {}, tokens)
  assert np.isfinite(first) and first == again


def _state_and_step(config):
  model = models.build(config)
  _, schedule = state_lib.make_optimizer(config.train)
  # Plain SGD (lr 1): the parameters after the step are params - gradients,
  # so the step compares every gradient leaf (AdamW's first step is about
  # lr * sign(g)).
  optimizer = optax.sgd(1.0)
  settings = train_lib.StepSettings.from_config(config, model)
  step = jax.jit(functools.partial(
      train_lib.train_step, model=model, optimizer=optimizer,
      schedule=schedule, settings=settings))
  return model, optimizer, step


def test_train_step_matches_unrolled():
  """DeepSeek-V3: gradients (through SGD), metrics and the bias post-update
  (through the indexed router paths); the scanned step remats every layer
  ('full')."""
  config, _, variables = _built('deepseek_v3')
  config = config.copy_and_resolve_references()
  model, optimizer, step = _state_and_step(config)
  state = state_lib.TrainState(
      step=jnp.zeros((), jnp.int32), params=variables['params'],
      opt_state=optimizer.init(variables['params']),
      router_state=variables['router_state'],
      router_hook=state_lib.init_router_hook(config))
  tokens = _tokens(config.model.vocab_size, rows=config.train.global_batch)
  batch = {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:]}
  new_state, metrics = step(state, batch)

  config.train.layer_loop = 'scan'
  config.train.remat = 'full'
  scan_model, scan_optimizer, scan_step = _state_and_step(config)
  assert scan_model.router_paths()[1] == (decoder.SCANNED, 'moe', 'router',
                                          'router', 1)
  L = config.model.num_layers
  params = decoder.stack_layer_params(state.params, L)
  scan_state = state.replace(
      params=params, opt_state=scan_optimizer.init(params),
      router_state=decoder.stack_layer_params(state.router_state, L))
  got_state, got_metrics = scan_step(scan_state, batch)

  _assert_trees_close(got_metrics, metrics)
  _assert_trees_close(got_state.params,
                      decoder.stack_layer_params(new_state.params, L))
  _assert_trees_close(got_state.router_state, decoder.stack_layer_params(
      new_state.router_state, L))
  # The post-update moved every layer's bias (by ±rate, or 0 at the mean).
  bias = got_state.router_state[decoder.SCANNED]['moe']['router']['router'][
      'bias']
  assert bias.shape[0] == L and np.all(np.any(np.asarray(bias) != 0, -1))


def test_layer_loop_choice_is_validated():
  config = _config('smoe')
  config.train.layer_loop = 'loop'
  with pytest.raises(ValueError, match=r"train\.layer_loop: expected one of "
                     r"\('unrolled', 'scan'\).*got 'loop'"):
    config_lib.validate(config)
  with pytest.raises(ValueError, match=r'train\.layer_loop'):
    models.build(config)
  config.train.layer_loop = 'scan'
  config_lib.validate(config)
  config.init.hf_path = '/some/hf/model'
  with pytest.raises(ValueError, match=r'train\.layer_loop.*init\.hf_path'):
    config_lib.validate(config)
