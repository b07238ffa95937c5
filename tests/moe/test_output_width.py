"""MoEBlock / DenseFFNBlock with an output width d_out != d_model.

LLaVA's projector (mlp2x_gelu, D -> F -> D') as an MoE: every path of the
block (the four grouped-matmul backends, capacity buffers, expert
parallelism, the shared expert) must give what a naive per-token loop gives,
forward and in gradients; the loop is written here from the math
(softmax top-k renormalised, y_t = Σ_k g_k f_e(x_t) [+ shared mix]) and reads
only the parameters. With d_out left at None nothing changes: the parameter
tree has the hand-written shapes, and d_out = d_model gives the same numbers.

Dimension legend: B batch, S sequence, T = B*S, D input width, D' output
width, F expert width, E experts, K slots.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.scipy.special import erf
from jax.sharding import NamedSharding, PartitionSpec as P

from moe_jax import sharding as sharding_lib
from moe_jax.moe.layer import DenseFFNBlock, MoEBlock

B, S, D, D_OUT, F, E, K = 2, 4, 16, 24, 8, 4, 2
TOL = dict(atol=1e-5, rtol=1e-5)


def _gelu(h):
  return 0.5 * h * (1.0 + erf(h / math.sqrt(2.0)))


def _mlp(p, v, e=None):
  """act(v W_in + b_in) W_out + b_out of expert e (or the one FFN)."""
  get = (lambda a: a) if e is None else (lambda a: a[e])
  h = v @ get(p['w_in'])
  if 'b_in' in p:
    h = h + get(p['b_in'])
  y = _gelu(h) @ get(p['w_out'])
  if 'b_out' in p:
    y = y + get(p['b_out'])
  return y


def naive_selection(params, x):
  """Per token the top-k experts of softmax(x w) (concrete ints)."""
  z = np.asarray(x.reshape(-1, D), np.float64) @ np.asarray(
      params['router']['router']['w'], np.float64)
  return [tuple(np.argsort(-row, kind='stable')[:K]) for row in z]


def naive_block(params, x, selection, shared_mix=None):
  """y [B, S, D'] one token and one slot at a time."""
  xt = x.reshape(-1, D)
  out = []
  for t, chosen in enumerate(selection):
    v = xt[t]
    p = jax.nn.softmax(v @ params['router']['router']['w'])
    total = sum(p[e] for e in chosen)
    y = jnp.zeros((D_OUT,), jnp.float32)
    for e in chosen:
      y = y + p[e] / total * _mlp(params['experts'], v, e)
    if shared_mix == 'half':
      y = 0.5 * (y + _mlp(params['shared'], v))
    out.append(y)
  return jnp.stack(out).reshape(B, S, D_OUT)


def _block(**kw):
  base = dict(d_model=D, d_out=D_OUT, num_experts=E, top_k=K, expert_width=F,
              router='smoe', activation='gelu', expert_bias=True,
              w_in_std=0.3, w_out_std=0.3)
  base.update(kw)
  return MoEBlock(**base)


@pytest.fixture(scope='module')
def setup():
  x = jax.random.normal(jax.random.key(1), (B, S, D))
  variables = jax.jit(_block(shared_experts=1, shared_mix='half').init)(
      jax.random.key(0), x)
  params = nn.unbox(variables['params'])
  # Non-zero biases and a router with clear margins.
  rng = np.random.default_rng(0)
  for part in ('experts', 'shared'):
    for name in ('b_in', 'b_out'):
      params[part][name] = jnp.asarray(
          rng.normal(0, 0.3, params[part][name].shape), jnp.float32)
  params['router']['router']['w'] = jnp.asarray(
      rng.normal(0, 1.0, params['router']['router']['w'].shape), jnp.float32)
  cot = jax.random.normal(jax.random.key(2), (B, S, D_OUT))
  return params, x, cot


def _routed_only(params):
  return {k: v for k, v in params.items() if k != 'shared'}


def _value_and_grads(apply, params, x, cot):
  """apply(params, x) and the gradients of <apply(params, x), cot>."""
  loss = lambda p, xx: jnp.sum(apply(p, xx) * cot)
  return apply(params, x), jax.grad(loss, argnums=(0, 1))(params, x)


_NAIVE = {}


def _naive(params, x, cot, shared_mix):
  """The naive loop's (y, grads), computed once per parameter set."""
  key = (shared_mix, tuple(sorted(params)))
  if key not in _NAIVE:
    selection = naive_selection(params, x)
    fn = lambda p, xx: naive_block(p, xx, selection, shared_mix)
    _NAIVE[key] = jax.jit(lambda p, xx: _value_and_grads(fn, p, xx, cot))(
        params, x)
  return _NAIVE[key]


def _compare(params, x, cot, got, shared_mix=None):
  """got = (y, grads) of the block against the naive loop's."""
  y, grads = got
  assert y.shape == (B, S, D_OUT)
  want_y, want_grads = _naive(params, x, cot, shared_mix)
  np.testing.assert_allclose(y, want_y, **TOL)
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(grads)[0],
                          jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(a, b, err_msg=jax.tree_util.keystr(path),
                               **TOL)


def _check(block, params, x, cot, shared_mix=None):
  apply = lambda p, xx: block.apply({'params': p}, xx)[0]
  got = jax.jit(lambda p, xx: _value_and_grads(apply, p, xx, cot))(params, x)
  _compare(params, x, cot, got, shared_mix)


@pytest.mark.parametrize('backend', ['loop', 'ragged_dot', 'blocked',
                                     'pallas'])
def test_backends_match_naive_loop(setup, backend):
  params, x, cot = setup
  block = _block(backend=backend)
  _check(block, _routed_only(params), x, cot)


def test_capacity_path_matches_naive_loop(setup):
  params, x, cot = setup
  block = _block(backend='loop', capacity_factor=4.0)   # room for every slot
  y, aux = jax.jit(block.apply)({'params': _routed_only(params)}, x)
  assert float(aux['metrics']['dropped_slots']) == 0.0
  _check(block, _routed_only(params), x, cot)


def test_shared_expert_half_mix_matches_naive_loop(setup):
  params, x, cot = setup
  block = _block(backend='blocked', shared_experts=1, shared_mix='half')
  assert params['shared']['w_out'].shape == (F, D_OUT)
  _check(block, params, x, cot, shared_mix='half')


def test_expert_parallel_matches_naive_loop(setup):
  params, x, cot = setup
  params = _routed_only(params)
  block = _block(backend='blocked')
  rules = (('batch', ('data', 'fsdp', 'expert')), ('seq', None),
           ('embed', None), ('mlp', None), ('expert', 'expert'))
  mesh = sharding_lib.make_mesh({'data': 1, 'fsdp': 1, 'expert': 2,
                                 'tensor': 1}, jax.devices()[:2])
  boxed = jax.eval_shape(block.init, jax.random.key(0), x)['params']
  shardings = sharding_lib.tree_shardings(boxed, mesh, rules)
  x_sharding = NamedSharding(mesh, P(('data', 'fsdp', 'expert')))

  apply = lambda p, xx: block.apply({'params': p}, xx)[0]
  fn = jax.jit(lambda p, xx: _value_and_grads(apply, p, xx, cot),
               in_shardings=(shardings, x_sharding))
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    args = (jax.device_put(params, shardings), jax.device_put(x, x_sharding))
    # The rows really travel between the two expert shards.
    assert 'all_to_all' in fn.lower(*args).as_text()
    got = fn(*args)
  _compare(params, x, cot, got)


def test_dense_ffn_block_output_width():
  x = jax.random.normal(jax.random.key(3), (B, S, D))
  block = DenseFFNBlock(d_model=D, width=F, d_out=D_OUT, activation='gelu',
                        use_bias=True)
  params = nn.unbox(jax.eval_shape(block.init, jax.random.key(0),
                                   x)['params'])
  shapes = jax.tree.map(lambda a: a.shape, params)
  assert shapes == {'ffn': {'w_in': (D, F), 'b_in': (F,), 'w_out': (F, D_OUT),
                            'b_out': (D_OUT,)}}
  rng = np.random.default_rng(1)
  params = jax.tree.map(
      lambda a: jnp.asarray(rng.normal(0, 0.3, a.shape), jnp.float32), params)
  y, _ = jax.jit(block.apply)({'params': params}, x)
  p = {k: np.asarray(v, np.float64) for k, v in params['ffn'].items()}
  xn = np.asarray(x, np.float64)
  h = xn @ p['w_in'] + p['b_in']
  h = 0.5 * h * (1 + np.vectorize(math.erf)(h / math.sqrt(2)))
  np.testing.assert_allclose(y, h @ p['w_out'] + p['b_out'], **TOL)


def test_default_leaves_the_tree_and_result_unchanged():
  x = jax.random.normal(jax.random.key(4), (B, S, D))
  kw = dict(d_model=D, num_experts=E, top_k=K, expert_width=F,
            activation='swiglu', shared_experts=1, backend='loop')
  variables = jax.jit(MoEBlock(**kw).init)(jax.random.key(0), x)
  shapes = jax.tree.map(lambda a: a.shape, nn.unbox(variables['params']))
  assert shapes == {
      'router': {'router': {'w': (D, E)}},
      'experts': {'w_in': (E, D, 2 * F), 'w_out': (E, F, D)},
      'shared': {'w_in': (D, 2 * F), 'w_out': (F, D)}}
  y_none, _ = jax.jit(MoEBlock(**kw).apply)(variables, x)
  y_same, _ = jax.jit(MoEBlock(**kw, d_out=D).apply)(variables, x)
  np.testing.assert_array_equal(y_none, y_same)
  dense = DenseFFNBlock(d_model=D, width=F)
  shapes = jax.tree.map(lambda a: a.shape, nn.unbox(jax.eval_shape(
      dense.init, jax.random.key(0), x)['params']))
  assert shapes == {'ffn': {'w_in': (D, F), 'b_in': (F,), 'w_out': (F, D),
                            'b_out': (D,)}}


def test_moe_plus_plus_copy_experts_need_d_out_equal_d_model():
  x = jnp.ones((B, S, D))
  block = _block(router='moe_plus_plus', backend='loop')
  with pytest.raises(ValueError, match='d_out'):
    jax.eval_shape(block.init, jax.random.key(0), x)
  # d_out = d_model is fine.
  jax.eval_shape(_block(router='moe_plus_plus', backend='loop', d_out=D).init,
                 jax.random.key(0), x)
