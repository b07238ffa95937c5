"""The blocked backend's ops against independent loop references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax.moe import blocked_gmm
from moe_jax.moe import dispatch


def _reference_gmm(x, w, group_sizes):
  """out[r] = x[r] @ w[group(r)] with plain numpy loops; rows past the groups 0."""
  x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
  out = np.zeros((x.shape[0], w.shape[-1]))
  start = 0
  for e, size in enumerate(np.asarray(group_sizes)):
    for r in range(start, start + size):
      out[r] = x[r] @ w[e]
    start += size
  return out


@pytest.mark.parametrize('group_sizes', [[8, 0, 16, 4], [0, 0, 28, 0],
                                         [4, 4, 4, 4]])
def test_gmm_blocked_forward_and_vjp_match_loops(group_sizes):
  rng = np.random.default_rng(0)
  group_sizes = jnp.asarray(group_sizes, jnp.int32)   # multiples of BM = 4
  x = jnp.asarray(rng.normal(size=(32, 5)), jnp.float32)  # R = 32 = 4 * 2 * 4
  w = jnp.asarray(rng.normal(size=(4, 5, 3)), jnp.float32)
  dy = jnp.asarray(rng.normal(size=(32, 3)), jnp.float32)
  gmm = lambda x, w: blocked_gmm.gmm_blocked(
      x, w, group_sizes, block_rows=4, blocks_per_step=2)
  out, vjp = jax.vjp(gmm, x, w)
  np.testing.assert_allclose(out, _reference_gmm(x, w, group_sizes),
                             atol=1e-5, rtol=1e-5)
  dx, dw = vjp(dy)
  # Independent backward: d x[r] = dy[r] w[g]ᵀ; d w[g] = Σ_{r in g} x[r]ᵀ dy[r].
  dx_ref = np.zeros(x.shape)
  dw_ref = np.zeros(w.shape)
  start = 0
  for e, size in enumerate(np.asarray(group_sizes)):
    for r in range(start, start + size):
      dx_ref[r] = np.asarray(dy[r]) @ np.asarray(w[e]).T
      dw_ref[e] += np.outer(np.asarray(x[r]), np.asarray(dy[r]))
    start += size
  np.testing.assert_allclose(dx, dx_ref, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(dw, dw_ref, atol=1e-5, rtol=1e-5)


def test_gmm_blocked_rejects_rows_not_multiple_of_step():
  with pytest.raises(ValueError, match='block_rows'):
    blocked_gmm.gmm_blocked(jnp.zeros((12, 2)), jnp.zeros((2, 2, 2)),
                            jnp.array([4, 4]), block_rows=4, blocks_per_step=2)


@pytest.mark.parametrize('activation,bias', [('relu', False), ('swiglu', True),
                                             ('gelu', True)])
def test_moe_ffn_blocked_matches_per_token_loop(activation, bias):
  rng = np.random.default_rng(1)
  t, k, e, d, f = 7, 2, 3, 4, 5
  f_in = 2 * f if activation == 'swiglu' else f
  expert_index = jnp.asarray([[0, 2], [2, 3], [1, 0], [0, 3], [2, 1], [0, 2],
                              [3, 3]], jnp.int32)   # 3 = sentinel: no FFN
  weight = jnp.asarray(rng.normal(size=(t, k)), jnp.float32)
  x = jnp.asarray(rng.normal(size=(t, d)), jnp.float32)
  params = {'w_in': rng.normal(size=(e, d, f_in)),
            'w_out': rng.normal(size=(e, f, d))}
  if bias:
    params.update(b_in=rng.normal(size=(e, f_in)), b_out=rng.normal(size=(e, d)))
  params = {n: jnp.asarray(v, jnp.float32) for n, v in params.items()}
  plan = dispatch.plan(expert_index, e, row_alignment=4, row_multiple=2)

  def fused(params, x, weight):
    return blocked_gmm.moe_ffn_blocked(
        params, x, weight, plan.token_of_row, plan.slot_of_row,
        plan.row_of_slot, plan.group_sizes, activation=activation,
        block_rows=4, blocks_per_step=2)

  def act(h):
    if activation == 'relu':
      return jax.nn.relu(h)
    if activation == 'gelu':
      return jax.nn.gelu(h, approximate=False)
    gate, up = h[:f], h[f:]
    return jax.nn.silu(gate) * up

  def naive(params, x, weight):
    out = []
    for i in range(t):
      y = jnp.zeros(d)
      for j in range(k):
        ex = int(expert_index[i, j])
        if ex == e:
          continue
        h = x[i] @ params['w_in'][ex] + (params['b_in'][ex] if bias else 0)
        o = act(h) @ params['w_out'][ex] + (params['b_out'][ex] if bias else 0)
        y = y + weight[i, j] * o
      out.append(y)
    return jnp.stack(out)

  np.testing.assert_allclose(fused(params, x, weight),
                             naive(params, x, weight), atol=1e-4, rtol=1e-5)
  loss = lambda fn: lambda *a: jnp.sum(jnp.sin(fn(*a)))
  got = jax.grad(loss(fused), argnums=(0, 1, 2))(params, x, weight)
  want = jax.grad(loss(naive), argnums=(0, 1, 2))(params, x, weight)
  for g, w_ in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w_, atol=1e-4, rtol=1e-4)
