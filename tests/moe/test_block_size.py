"""The blocked backend's shape-dependent block size.

The block size BM of `blocked` follows the expected rows per expert T*K/E
(backends.blocked_block_rows); dispatch pads every group to the same BM
because both come from the one Backend that for_dispatch returns. Here: the
rule against a hand-computed table, the padding / block agreement, and the
blocked ops at several block sizes against loop references, forward and
gradients, on uneven groups with empty experts.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax.moe import backends
from moe_jax.moe import blocked_gmm
from moe_jax.moe import dispatch
from moe_jax.moe.layer import MoEBlock

# float32: levanter's 1e-5 for simple functions, 1e-4 for composites
# (style.md §5).
TOL = dict(atol=1e-5, rtol=1e-5)
TOL_FFN = dict(atol=1e-4, rtol=1e-4)

# (T, K, E) -> BM, by hand: r = T*K/E, nearest power of two on a log scale
# (2^a <= r < 2^(a+0.5) rounds down), clamped to [16, 128].
RULE_TABLE = [
    (128, 8, 66, 16),      # r = 15.5 (the 128-token case)
    (512, 8, 66, 64),      # r = 62.1
    (4096, 8, 66, 128),    # r = 496.5, capped
    (64, 8, 66, 16),       # r = 7.76 -> 8, raised to the minimum
    (1, 1, 64, 16),        # r = 1/64
    (24, 2, 4, 16),        # r = 12 (2^3.58 -> 16)
    (180, 2, 8, 32),       # r = 45 < 32*sqrt(2) = 45.25
    (182, 2, 8, 64),       # r = 45.5 > 45.25
    (100, 6, 16, 32),      # r = 37.5
    (2048, 8, 64, 128),    # r = 256, capped
]


@pytest.mark.parametrize('t,k,e,block_rows', RULE_TABLE)
def test_block_rows_rule_table(t, k, e, block_rows):
  assert backends.blocked_block_rows(t * k, e) == block_rows


@pytest.mark.parametrize('t,k,e,block_rows', RULE_TABLE)
def test_for_dispatch_pads_rows_to_the_kernel_block(t, k, e, block_rows):
  """Row alignment, row multiple and the kernel's block come from one object."""
  sized = backends.get_backend('blocked').for_dispatch(t * k, e)
  assert sized.row_alignment == block_rows
  assert sized.row_multiple == backends.BLOCKS_PER_STEP
  for op in (sized.gmm, sized.moe_ffn):
    assert op.keywords == {'block_rows': block_rows,
                           'blocks_per_step': backends.BLOCKS_PER_STEP}
  # Cached: one Backend (one jit trace) per block size.
  assert sized is backends.get_backend('blocked').for_dispatch(t * k, e)


@pytest.mark.parametrize('name', ['loop', 'ragged_dot', 'pallas'])
def test_for_dispatch_keeps_backends_without_a_rule(name):
  backend = backends.get_backend(name)
  assert backend.for_dispatch(1024, 66) is backend


# Uneven groups over E = 6 with empty experts 2 and 5, one group longer than
# 128 rows (several blocks at every BM) and groups shorter than 8.
GROUP_SIZES = (150, 3, 0, 37, 9, 0)


def _expert_index(seed=0):
  """[T, 1] expert ids with GROUP_SIZES rows each, plus sentinels (id E)."""
  ids = np.repeat(np.arange(len(GROUP_SIZES)), GROUP_SIZES)
  ids = np.concatenate([ids, np.full(5, len(GROUP_SIZES))])   # no-FFN slots
  return jnp.asarray(np.random.default_rng(seed).permutation(ids)[:, None],
                     jnp.int32)


@pytest.mark.parametrize('block_rows', [8, 16, 32, 128])
def test_gmm_blocked_equals_loop_forward_and_vjp(block_rows):
  rng = np.random.default_rng(1)
  g = backends.BLOCKS_PER_STEP
  e, d, f = len(GROUP_SIZES), 5, 3
  plan = dispatch.plan(_expert_index(), e, block_rows, g)
  np.testing.assert_array_equal(plan.tokens_per_expert, GROUP_SIZES)
  r = plan.token_of_row.shape[0]
  x = jnp.asarray(rng.normal(size=(r, d)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(e, d, f)), jnp.float32)
  dy = jnp.asarray(rng.normal(size=(r, f)), jnp.float32)
  blocked = lambda x, w: blocked_gmm.gmm_blocked(
      x, w, plan.group_sizes, block_rows=block_rows, blocks_per_step=g)
  loop = lambda x, w: backends.gmm_loop(x, w, plan.group_sizes)
  out, vjp = jax.vjp(blocked, x, w)
  out_ref, vjp_ref = jax.vjp(loop, x, w)
  np.testing.assert_allclose(out, out_ref, **TOL)
  for got, want in zip(vjp(dy), vjp_ref(dy)):
    np.testing.assert_allclose(got, want, **TOL)


@pytest.mark.parametrize('block_rows', [8, 16, 32, 128])
def test_moe_ffn_blocked_equals_loop_forward_and_grad(block_rows):
  """Fused gather + FFN + combine vs dispatch -> loop gmm FFN -> combine."""
  rng = np.random.default_rng(2)
  g = backends.BLOCKS_PER_STEP
  e, d, f = len(GROUP_SIZES), 4, 5
  expert_index = _expert_index(seed=3)
  t = expert_index.shape[0]
  plan = dispatch.plan(expert_index, e, block_rows, g)
  params = {'w_in': rng.normal(size=(e, d, 2 * f)),
            'w_out': rng.normal(size=(e, f, d)),
            'b_in': rng.normal(size=(e, 2 * f)),
            'b_out': rng.normal(size=(e, d))}
  params = {n: jnp.asarray(v, jnp.float32) for n, v in params.items()}
  x = jnp.asarray(rng.normal(size=(t, d)), jnp.float32)
  weight = jnp.asarray(rng.normal(size=(t, 1)), jnp.float32)

  def fused(params, x, weight):
    return blocked_gmm.moe_ffn_blocked(
        params, x, weight, plan.token_of_row, plan.slot_of_row,
        plan.row_of_slot, plan.group_sizes, activation='swiglu',
        block_rows=block_rows, blocks_per_step=g)

  def reference(params, x, weight):
    """Unfused, every grouped matmul the O(E) masked loop."""
    owner = np.repeat(np.arange(e), np.asarray(plan.group_sizes))
    owner = jnp.asarray(np.pad(owner, (0, plan.token_of_row.shape[0]
                                       - owner.shape[0]), constant_values=0))
    rows = dispatch.dispatch(x, plan)
    h = backends.gmm_loop(rows, params['w_in'], plan.group_sizes)
    h = h + params['b_in'][owner]
    gate, up = h[:, :f], h[:, f:]
    y = backends.gmm_loop(jax.nn.silu(gate) * up, params['w_out'],
                          plan.group_sizes) + params['b_out'][owner]
    return dispatch.combine(y, weight, plan)

  np.testing.assert_allclose(fused(params, x, weight),
                             reference(params, x, weight), **TOL_FFN)
  loss = lambda fn: lambda *a: jnp.sum(jnp.sin(fn(*a)))
  got = jax.grad(loss(fused), argnums=(0, 1, 2))(params, x, weight)
  want = jax.grad(loss(reference), argnums=(0, 1, 2))(params, x, weight)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, **TOL_FFN)
  # The empty experts get exactly zero weight gradients.
  for name in params:
    np.testing.assert_array_equal(got[0][name][jnp.array([2, 5])], 0.0)


@pytest.mark.parametrize('tokens,block_rows', [(32, 16), (64, 32), (128, 64),
                                               (512, 128)])
def test_layer_blocked_equals_loop_at_rule_block_sizes(tokens, block_rows,
                                                      monkeypatch):
  """MoEBlock: the rule's block (E 4, K 2: T*K/E = T/2) gives the loop's
  output and gradients with respect to x and every parameter."""
  alignments = []
  plan = dispatch.plan

  def spy(expert_index, num_experts, row_alignment=1, row_multiple=1):
    alignments.append(row_alignment)
    return plan(expert_index, num_experts, row_alignment, row_multiple)

  monkeypatch.setattr(dispatch, 'plan', spy)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, tokens // 2, 16))
  results = []
  for name in ('blocked', 'loop'):
    block = MoEBlock(d_model=16, num_experts=4, top_k=2, expert_width=8,
                     activation='swiglu', expert_bias=True, backend=name)
    variables = block.init(jax.random.PRNGKey(1), x)

    def loss(params, x):
      y, aux = block.apply({**variables, 'params': params}, x)
      return jnp.sum(jnp.sin(y)) + sum(aux['losses'].values())

    results.append(jax.value_and_grad(loss, argnums=(0, 1))(
        variables['params'], x))
  # The layer planned with the rule's block (blocked) and no padding (loop).
  assert set(alignments) == {block_rows, 1}
  for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1])):
    np.testing.assert_allclose(a, b, **TOL_FFN)
