"""Sharded train steps on 8 CPU devices equal the single-device step.

For each mesh layout (data, FSDP, expert and their combinations) the loss and
every gradient of one micro-batch of the :tiny config, with parameters,
optimiser state and batch laid out by the config's logical-axis rules, must
match the same computation on one device to 1e-5 in float32.
"""

import functools
import pathlib

import flax.linen as nn
import jax
import numpy as np
import pytest

from moe_jax import config_lib
from moe_jax import models
from moe_jax import sharding as sharding_lib
from moe_jax import state as state_lib
from moe_jax import train as train_lib

CONFIGS = pathlib.Path(__file__).resolve().parents[2] / 'configs'

MESHES = {
    'data8': dict(data=8),
    'fsdp8': dict(data=1, fsdp=8),
    'data2_expert4': dict(data=2, expert=4),
    'fsdp2_expert4': dict(data=1, fsdp=2, expert=4),
}


def tiny(router: str, mesh: dict | None = None):
  config = config_lib.load_config(f'{CONFIGS}/{router}_154m.py:tiny')
  config.train.seq_len = 16
  for axis, size in (mesh or {}).items():
    config.mesh[axis] = size
  return config


@functools.lru_cache(maxsize=None)
def initial_state(router: str):
  """The router's initial TrainState on one device (shared by the layouts)."""
  config = tiny(router)
  model = models.build(config)
  optimizer, _ = state_lib.make_optimizer(config.train)
  init = functools.partial(state_lib.init_state, model=model,
                           optimizer=optimizer, config=config)
  return jax.device_get(jax.jit(lambda k: nn.unbox(init(k)))(
      jax.random.key(0)))


def loss_and_grads(config, devices):
  """(loss, grads) of one micro-batch with the config's mesh over devices."""
  mesh = sharding_lib.make_mesh(config.mesh, devices)
  rules = sharding_lib.logical_rules(config.mesh)
  model = models.build(config)
  optimizer, _ = state_lib.make_optimizer(config.train)
  settings = train_lib.StepSettings.from_config(config, model)
  init = functools.partial(state_lib.init_state, model=model,
                           optimizer=optimizer, config=config)
  key = jax.random.key(0)
  shardings = sharding_lib.tree_shardings(jax.eval_shape(init, key), mesh,
                                          rules)
  batch_sharding = sharding_lib.batch_sharding(mesh, rules)
  tokens = np.random.default_rng(0).integers(
      0, config.model.vocab_size,
      (config.train.global_batch, config.train.seq_len + 1))
  batch = {'inputs': tokens[:, :-1].astype(np.int32),
           'targets': tokens[:, 1:].astype(np.int32)}
  batch = sharding_lib.global_batch(batch, batch_sharding)

  def fn(state, batch):
    grad = jax.value_and_grad(functools.partial(
        train_lib._micro_loss, model=model, settings=settings), has_aux=True)
    (loss, _), grads = grad(state.params, state.router_state,
                            state.router_hook, batch, state.step,
                            jax.random.key(1))
    return loss, grads

  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    state = jax.device_put(initial_state(config.moe.router), shardings)
    loss, grads = jax.jit(fn, in_shardings=(shardings, batch_sharding))(
        state, batch)
  return jax.device_get(loss), jax.device_get(grads), state


@functools.lru_cache(maxsize=None)
def reference(router: str):
  return loss_and_grads(tiny(router), jax.devices()[:1])[:2]


@pytest.mark.parametrize('mesh_name', list(MESHES))
@pytest.mark.parametrize('router', ['smoe', 'deepseek_v3', 'moe_plus_plus'])
def test_sharded_loss_and_grads_equal_one_device(router, mesh_name):
  loss, grads, state = loss_and_grads(tiny(router, MESHES[mesh_name]),
                                      jax.devices())
  ref_loss, ref_grads = reference(router)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  flat = jax.tree_util.tree_flatten_with_path(grads)[0]
  ref_flat = jax.tree.leaves(ref_grads)
  for (path, g), r in zip(flat, ref_flat):
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6,
                               err_msg=jax.tree_util.keystr(path))
  # The layout is real: expert weights are split over the expert axis and
  # FSDP splits the 'embed' axis.
  w_in = state.params['layer_0']['moe']['experts']['w_in']     # [E, D, F]
  spec = w_in.sharding.spec
  if 'expert' in mesh_name:
    assert spec[0] == 'expert'
  if 'fsdp' in mesh_name:
    assert spec[1] == 'fsdp'
