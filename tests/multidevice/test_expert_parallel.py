"""Expert-parallel MoE layer (all-to-all dispatch) drops nothing under
maximally unbalanced routing.

With the router weights zeroed every token's logits tie, so top-k picks
experts 0..k-1 for every token: all routed rows go to the experts of the
first expert shard. Sharded over data=2 x expert=4 the layer must give the
single-device output and gradients and report no dropped slots.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from moe_jax import sharding as sharding_lib
from moe_jax.moe.layer import MoEBlock

RULES = (('batch', ('data', 'fsdp', 'expert')), ('seq', None),
         ('embed', None), ('mlp', None), ('expert', 'expert'))


def _unbalanced_params(block, x):
  variables = block.init(jax.random.key(0), x)
  params = nn.unbox(variables['params'])
  router = params['router']['router']
  params['router']['router'] = jax.tree.map(jnp.zeros_like, router)
  return params


def test_all_tokens_to_one_expert_shard_drop_nothing():
  block = MoEBlock(d_model=16, num_experts=8, top_k=2, expert_width=8,
                   router='smoe', backend='blocked')
  x = jax.random.normal(jax.random.key(1), (8, 4, 16))          # [B, S, D]
  params = _unbalanced_params(block, x)

  def loss(params, x):
    y, aux = block.apply({'params': params}, x)
    return jnp.sum(y ** 2), aux['metrics']

  grad = jax.value_and_grad(loss, has_aux=True)
  (ref_loss, ref_metrics), ref_grads = jax.jit(grad)(params, x)
  counts = np.asarray(ref_metrics['expert_counts'])
  np.testing.assert_array_equal(counts, [32, 32, 0, 0, 0, 0, 0, 0])

  mesh_config = {'data': 2, 'fsdp': 1, 'expert': 4, 'tensor': 1}
  mesh = sharding_lib.make_mesh(mesh_config, jax.devices()[:8])
  boxed = jax.eval_shape(block.init, jax.random.key(0), x)['params']
  shardings = sharding_lib.tree_shardings(boxed, mesh, RULES)
  x_sharding = NamedSharding(mesh, P(('data', 'fsdp', 'expert')))
  with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
    sharded = jax.jit(grad, in_shardings=(shardings, x_sharding))
    args = (jax.device_put(params, shardings), jax.device_put(x, x_sharding))
    # The tokens really travel: the program exchanges rows by all-to-all.
    assert 'all_to_all' in sharded.lower(*args).as_text()
    (loss_value, metrics), grads = sharded(*args)
  w_in = jax.device_put(params, shardings)['experts']['w_in']
  assert w_in.sharding.spec[0] == 'expert'
  assert float(metrics['dropped_slots']) == 0.0
  np.testing.assert_array_equal(np.asarray(metrics['expert_counts']), counts)
  np.testing.assert_allclose(loss_value, ref_loss, rtol=1e-5)
  for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6)


def test_indivisible_layout_names_parameter_and_axis():
  block = MoEBlock(d_model=16, num_experts=6, top_k=2, expert_width=8)
  x = jnp.zeros((8, 4, 16))
  boxed = jax.eval_shape(block.init, jax.random.key(0), x)['params']
  mesh = sharding_lib.make_mesh(
      {'data': 2, 'fsdp': 1, 'expert': 4, 'tensor': 1}, jax.devices()[:8])
  try:
    sharding_lib.tree_shardings(boxed, mesh, RULES)
  except ValueError as e:
    message = str(e)
  else:
    raise AssertionError('6 experts over 4 expert shards were accepted')
  assert "['experts']['w_in']" in message
  assert "logical axis 'expert'" in message and 'size 6' in message
  assert "('expert',) of 4 devices" in message


# Routers not already covered by the sharded train-step tests (smoe,
# deepseek_v3, moe_plus_plus), with their special slots where they have them.
OTHER_ROUTERS = {
    'sigmoid': {}, 'xmoe': {}, 'cosine': {}, 'perturbed_cosine': {},
    'hyper': {}, 'deepseek_v2': {}, 'tc_moe': {'num_null': 2},
    'remoe': {},
}


@pytest.mark.parametrize('router', list(OTHER_ROUTERS))
def test_every_router_under_expert_parallelism(router):
  block = MoEBlock(d_model=16, num_experts=8, top_k=2, expert_width=8,
                   router=router, router_options=OTHER_ROUTERS[router],
                   shared_experts=1 if router == 'deepseek_v2' else 0)
  x = jax.random.normal(jax.random.key(1), (8, 4, 16))          # [B, S, D]
  variables = nn.unbox(block.init(jax.random.key(0), x))
  params = variables['params']
  state = {k: v for k, v in variables.items() if k != 'params'}

  def loss(params, x):
    y, aux = block.apply({'params': params, **state}, x, train=True,
                         rngs={'router': jax.random.key(2)})
    return jnp.sum(y ** 2) + sum(aux['losses'].values())

  grad = jax.value_and_grad(loss)
  ref_loss, ref_grads = jax.jit(grad)(params, x)
  mesh = sharding_lib.make_mesh(
      {'data': 2, 'fsdp': 1, 'expert': 4, 'tensor': 1}, jax.devices()[:8])
  boxed = jax.eval_shape(block.init, jax.random.key(0), x)['params']
  shardings = sharding_lib.tree_shardings(boxed, mesh, RULES)
  x_sharding = NamedSharding(mesh, P(('data', 'fsdp', 'expert')))
  with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
    value, grads = jax.jit(grad, in_shardings=(shardings, x_sharding))(
        jax.device_put(params, shardings), jax.device_put(x, x_sharding))
  np.testing.assert_allclose(value, ref_loss, rtol=1e-5)
  for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6)
