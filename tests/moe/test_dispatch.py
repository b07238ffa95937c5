"""Tests of moe_jax.moe.dispatch against naive loops.

Dropless: `plan` / `dispatch` / `combine` against a plain Python loop that lays
each expert's slots out contiguously (in token-major slot order) and pads every
group to the row alignment; gradients against a naive jnp implementation.
Capacity: a hand-worked GShard example (slot-major priority) and the
large-capacity limit, which must equal dropless.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax.moe import dispatch
from moe_jax.moe.layer import MoEBlock

T, K, E, D = 7, 2, 4, 3
SENTINEL = E
# Expert 1 receives no slot; three slots are sentinels (null / zero / copy).
INDEX = np.array([[0, 2],
                  [2, 0],
                  [3, SENTINEL],
                  [0, 3],
                  [SENTINEL, 2],
                  [2, 3],
                  [0, SENTINEL]], np.int32)


def naive_plan(index, num_experts, align):
  """Row layout by a loop: expert by expert, slots in t*K + k order."""
  t_count, k_count = index.shape
  row_of_slot = {}
  token_of_row, slot_of_row = {}, {}
  sizes, padded = [], []
  start = 0
  for e in range(num_experts):
    slots = [(t, k) for t in range(t_count) for k in range(k_count)
             if index[t, k] == e]
    for i, (t, k) in enumerate(slots):
      row_of_slot[(t, k)] = start + i
      token_of_row[start + i] = t
      slot_of_row[start + i] = t * k_count + k
    sizes.append(len(slots))
    padded.append(math.ceil(len(slots) / align) * align)
    start += padded[-1]
  return row_of_slot, token_of_row, slot_of_row, sizes, padded


@pytest.mark.parametrize('align,multiple', [(1, 1), (4, 1), (4, 2)])
def test_plan_matches_naive_layout(align, multiple):
  st = dispatch.plan(jnp.asarray(INDEX), E, align, multiple)
  row_of_slot, token_of_row, slot_of_row, sizes, padded = naive_plan(
      INDEX, E, align)
  r = st.token_of_row.shape[0]
  assert r % (align * multiple) == 0
  assert r >= sum(padded)
  np.testing.assert_array_equal(st.tokens_per_expert, sizes)
  np.testing.assert_array_equal(st.group_sizes, padded)
  assert sizes[1] == 0 and padded[1] == 0      # an expert with no tokens
  for t in range(T):
    for k in range(K):
      expected = row_of_slot.get((t, k), r)      # sentinel slots: no row (R)
      assert int(st.row_of_slot[t, k]) == expected, (t, k)
  for row in range(r):
    assert int(st.token_of_row[row]) == token_of_row.get(row, T), row
    assert int(st.slot_of_row[row]) == slot_of_row.get(row, T * K), row
  # Sentinel slots take no row: rows in use = non-sentinel slots.
  assert len(token_of_row) == int(np.sum(INDEX < E))


def test_padding_with_alignment_4():
  # Sizes by hand: e0 <- t0, t1, t3, t6; e1 <- none; e2 <- t0, t1, t4, t5;
  # e3 <- t2, t3, t5. Padded to [4, 0, 4, 4]: one padding row after e3, none
  # for the empty expert.
  st = dispatch.plan(jnp.asarray(INDEX), E, 4)
  np.testing.assert_array_equal(st.tokens_per_expert, [4, 0, 4, 3])
  np.testing.assert_array_equal(st.group_sizes, [4, 0, 4, 4])
  tok = np.asarray(st.token_of_row)
  assert list(tok[:4]) == [0, 1, 3, 6] and list(tok[4:8]) == [0, 1, 4, 5]
  assert list(tok[8:12]) == [2, 3, 5, T]
  assert np.all(tok[12:] == T)


@pytest.mark.parametrize('align,dtype', [(1, jnp.float32), (4, jnp.float32),
                                         (4, jnp.bfloat16)])
def test_dispatch_and_combine_match_naive_loop(align, dtype):
  rng = np.random.default_rng(0)
  # Values exactly representable in bfloat16, so only the sum rounds.
  x = (rng.integers(-8, 8, size=(T, D)) / 4).astype(np.float32)
  w = rng.normal(size=(T, K)).astype(np.float32)
  st = dispatch.plan(jnp.asarray(INDEX), E, align)
  rows = np.asarray(dispatch.dispatch(jnp.asarray(x, dtype), st),
                    np.float32)
  row_of_slot, token_of_row, _, _, _ = naive_plan(INDEX, E, align)
  expected_rows = np.zeros_like(rows)
  for row, t in token_of_row.items():
    expected_rows[row] = x[t]
  np.testing.assert_array_equal(rows, expected_rows)   # padding rows are 0

  # Combine arbitrary per-row outputs: y[t] = Σ_k w[t,k] out[row(t,k)].
  out = (rng.integers(-8, 8, size=rows.shape) / 4).astype(np.float32)
  y = dispatch.combine(jnp.asarray(out, dtype), jnp.asarray(w), st)
  assert y.dtype == dtype
  y = np.asarray(y, np.float32)
  expected_y = np.zeros((T, D), np.float32)
  for t in range(T):
    for k in range(K):
      if INDEX[t, k] < E:
        w_tk = float(jnp.asarray(w[t, k], dtype))   # the weight as cast
        expected_y[t] += w_tk * out[row_of_slot[(t, k)]]
  tol = 1e-6 if dtype == jnp.float32 else 2e-2
  np.testing.assert_allclose(y, expected_y, rtol=tol, atol=tol)


def test_sentinel_slots_contribute_nothing():
  # A huge weight on every sentinel slot must not reach the output.
  x = jnp.ones((T, D))
  w = jnp.where(jnp.asarray(INDEX) == SENTINEL, 1e6, 1.0)
  st = dispatch.plan(jnp.asarray(INDEX), E, 4)
  y = dispatch.combine(dispatch.dispatch(x, st), w, st)
  np.testing.assert_allclose(y, np.sum(INDEX < E, axis=1)[:, None] * np.ones(
      (T, D)), rtol=1e-6)


def expert_fn(rows, mats, owner):
  """A per-expert nonlinear map tanh(row @ W[e])."""
  return jnp.tanh(jnp.einsum('rd,rdf->rf', rows, mats[owner]))


def owner_of_rows(group_sizes, r):
  ends = np.cumsum(np.asarray(group_sizes))
  return np.minimum(np.searchsorted(ends, np.arange(r), side='right'), E - 1)


@pytest.mark.parametrize('align', [1, 4])
def test_gradients_match_naive(align):
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(T, D)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(T, K)), jnp.float32)
  mats = jnp.asarray(rng.normal(size=(E, D, D)), jnp.float32)
  g = jnp.asarray(rng.normal(size=(T, D)), jnp.float32)
  st = dispatch.plan(jnp.asarray(INDEX), E, align)
  owner = jnp.asarray(owner_of_rows(st.group_sizes, st.token_of_row.shape[0]))

  def sorted_loss(x, w, mats):
    rows = expert_fn(dispatch.dispatch(x, st), mats, owner)
    return jnp.sum(g * dispatch.combine(rows, w, st))

  @jax.jit
  def naive_loss(x, w, mats):
    y = jnp.zeros((T, D))
    for t in range(T):
      for k in range(K):
        e = int(INDEX[t, k])
        if e < E:
          y = y.at[t].add(w[t, k] * jnp.tanh(x[t] @ mats[e]))
    return jnp.sum(g * y)

  np.testing.assert_allclose(sorted_loss(x, w, mats), naive_loss(x, w, mats),
                             rtol=1e-5)
  got = jax.grad(sorted_loss, argnums=(0, 1, 2))(x, w, mats)
  want = jax.grad(naive_loss, argnums=(0, 1, 2))(x, w, mats)
  for name, a, b in zip(('x', 'weight', 'experts'), got, want):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=name)
  # Sentinel slots get no weight gradient.
  assert np.all(np.asarray(got[1])[INDEX == SENTINEL] == 0)


def test_gradients_under_jit():
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(T, D)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(T, K)), jnp.float32)

  @jax.jit
  def f(x, w, index):
    st = dispatch.plan(index, E, 4)
    return jnp.sum(dispatch.combine(dispatch.dispatch(x, st) ** 2, w, st))

  dx, dw = jax.grad(f, argnums=(0, 1))(x, w, jnp.asarray(INDEX))
  # f = Σ_t Σ_{k: e<E} w_tk Σ_d x_td²: dx = 2 x Σ_k w, dw = Σ_d x² (real slots).
  real = INDEX < E
  np.testing.assert_allclose(
      dx, 2 * np.asarray(x) * np.sum(np.where(real, w, 0), 1)[:, None],
      rtol=1e-5)
  np.testing.assert_allclose(
      dw, np.where(real, np.sum(np.asarray(x) ** 2, 1)[:, None], 0), rtol=1e-5)


# ----------------------------------------------------------- capacity mode

def test_capacity_slot_major_priority_hand_example():
  # T=4, K=2, E=2, capacity factor 0.5 -> C = ceil(0.5 * 4 * 2 / 2) = 2.
  index = jnp.asarray([[0, 1],
                       [0, 1],
                       [1, 0],
                       [1, 2]], jnp.int32)   # 2 = sentinel (not an FFN slot)
  weight = jnp.asarray([[0.6, 0.4],
                        [0.7, 0.3],
                        [0.8, 0.2],
                        [0.9, 0.1]], jnp.float32)
  cap = dispatch.plan_capacity(index, weight, 2, 0.5)
  # Slot 0 of every token first: t0->e0 c0, t1->e0 c1, t2->e1 c0, t3->e1 c1.
  # Then slot 1: t0->e1, t1->e1, t2->e0 all find their expert full; t3's slot
  # 1 is a sentinel. Token-major order would instead keep t0 and t1 whole.
  mask = np.zeros((4, 2, 2))
  mask[0, 0, 0] = mask[1, 0, 1] = mask[2, 1, 0] = mask[3, 1, 1] = 1
  np.testing.assert_array_equal(cap.dispatch_mask, mask)
  combine_w = mask * np.array([0.6, 0.7, 0.8, 0.9])[:, None, None]
  np.testing.assert_allclose(cap.combine_weight, combine_w, rtol=1e-6)
  assert int(cap.dropped) == 3      # 7 FFN slots, 4 kept

  x = jnp.asarray([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [0.0, 3.0]])
  buf = dispatch.dispatch_capacity(x, cap)
  np.testing.assert_array_equal(buf, [[[1, 0], [0, 1]], [[2, 0], [0, 3]]])
  y = dispatch.combine_capacity(buf * 10.0, cap)
  np.testing.assert_allclose(
      y, [[6.0, 0.0], [0.0, 7.0], [16.0, 0.0], [0.0, 27.0]], rtol=1e-6)


def test_capacity_uses_ceil():
  assert dispatch.capacity(4, 2, 2, 0.5) == 2
  assert dispatch.capacity(5, 2, 4, 1.0) == 3        # ceil(2.5)
  assert dispatch.capacity(1, 1, 8, 0.1) == 1        # at least 1


def test_large_capacity_equals_dropless():
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(T, D)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(T, K)), jnp.float32)
  mats = jnp.asarray(rng.normal(size=(E, D, D)), jnp.float32)
  index = jnp.asarray(INDEX)
  cap = dispatch.plan_capacity(index, w, E, float(E))  # C = T*K
  assert int(cap.dropped) == 0
  buf = dispatch.dispatch_capacity(x, cap)                        # [E, C, D]
  y_cap = dispatch.combine_capacity(
      jnp.tanh(jnp.einsum('ecd,edf->ecf', buf, mats)), cap)
  st = dispatch.plan(index, E, 4)
  owner = jnp.asarray(owner_of_rows(st.group_sizes, st.token_of_row.shape[0]))

  def sorted_y(x, w):
    return dispatch.combine(expert_fn(dispatch.dispatch(x, st), mats, owner),
                            w, st)

  def capacity_y(x, w):
    cap = dispatch.plan_capacity(index, w, E, float(E))
    buf = dispatch.dispatch_capacity(x, cap)
    return dispatch.combine_capacity(
        jnp.tanh(jnp.einsum('ecd,edf->ecf', buf, mats)), cap)

  np.testing.assert_allclose(y_cap, sorted_y(x, w), rtol=1e-5, atol=1e-6)
  # Gradients w.r.t. x and the routing weights agree too.
  g = jnp.asarray(rng.normal(size=(T, D)), jnp.float32)
  got = jax.grad(lambda x, w: jnp.sum(g * capacity_y(x, w)), (0, 1))(x, w)
  want = jax.grad(lambda x, w: jnp.sum(g * sorted_y(x, w)), (0, 1))(x, w)
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_moe_block_capacity_equals_dropless_when_nothing_drops():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 8))
  kw = dict(d_model=8, num_experts=4, top_k=2, expert_width=16,
            backend='loop')
  dropless = MoEBlock(**kw)
  capped = MoEBlock(**kw, capacity_factor=4.0)
  # Random values on eval_shape's tree (a jitted init compiles for seconds).
  shapes = nn.meta.unbox(jax.eval_shape(dropless.init, jax.random.PRNGKey(0),
                                        x))
  rng = np.random.default_rng(4)
  variables = jax.tree.map(
      lambda s: jnp.asarray(0.5 * rng.normal(size=s.shape), s.dtype), shapes)
  y0, aux0 = jax.jit(dropless.apply)(variables, x)
  y1, aux1 = jax.jit(capped.apply)(variables, x)
  np.testing.assert_allclose(y1, y0, rtol=1e-5, atol=1e-6)
  assert float(aux1['metrics']['dropped_slots']) == 0.0
  # A small capacity drops slots and changes the output.
  tight = MoEBlock(**kw, capacity_factor=0.25)
  y2, aux2 = jax.jit(tight.apply)(variables, x)
  assert float(aux2['metrics']['dropped_slots']) > 0
  assert not np.allclose(y2, y0)
