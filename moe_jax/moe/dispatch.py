"""Token dispatch: route slots to expert-sorted rows and combine the results back.

Dropless (default): `dispatch` sorts the T*K (token, slot) assignments by expert
(argsort), lays each expert's rows out contiguously, padding every group to a
multiple of `row_alignment` (1 for `loop` / `ragged_dot`; the tile size for
block backends), and gathers the token rows. Slots whose expert is the
sentinel E (null, zero, copy, constant, inactive) get no row. `combine` gathers
each slot's output row back and sums over slots with the routing weights.
Both are custom VJPs whose backward passes are gathers too (no scatter-add;
MaxText's recipe, performance.md §5), and gradients reach x and the weights.

Capacity mode (GShard, Lepikhin et al. 2020): one-hot dispatch / combine
einsums with capacity C = ceil(capacity_factor * T * K / E) per expert, slot 0 of
every token before slot 1 (GShard's priority); overflowing slots are dropped
and counted.

Dimension legend: T tokens, D model width, E experts, K slots, R rows,
C capacity.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import struct

Array = jax.Array


@struct.dataclass
class DispatchState:
  """Where every slot went.

  Attributes:
    row_of_slot: [T, K] int32 row of each slot; R (one past the end) for slots
      without a row.
    token_of_row: [R] int32 token of each row; T for padding rows.
    slot_of_row: [R] int32 flat slot index t*K + k of each row; T*K for padding.
    group_sizes: [E] int32 rows per expert, padded to the row alignment.
    tokens_per_expert: [E] int32 real (unpadded) rows per expert.
  """

  row_of_slot: Array
  token_of_row: Array
  slot_of_row: Array
  group_sizes: Array
  tokens_per_expert: Array


def num_rows(num_slots: int, num_experts: int, row_alignment: int,
             row_multiple: int = 1) -> int:
  """Static R: room for every slot plus worst-case padding of each group."""
  rows = num_slots + num_experts * (row_alignment - 1)
  multiple = row_alignment * row_multiple
  return max(multiple, -(-rows // multiple) * multiple)


def plan(expert_index: Array, num_experts: int, row_alignment: int = 1,
         row_multiple: int = 1) -> DispatchState:
  """Sorts slots by expert. expert_index [T, K] int32 with E as the sentinel."""
  t, k = expert_index.shape
  r = num_rows(t * k, num_experts, row_alignment, row_multiple)
  flat = expert_index.reshape(-1)                                # [T*K]
  sizes = jnp.zeros((num_experts + 1,), jnp.int32).at[flat].add(1)
  sizes = sizes[:num_experts]                                    # [E]
  padded = -(-sizes // row_alignment) * row_alignment
  padded_start = jnp.cumsum(padded) - padded
  start = jnp.cumsum(sizes) - sizes
  order = jnp.argsort(flat, stable=True).astype(jnp.int32)       # [T*K]
  sorted_expert = flat[order]
  is_real = sorted_expert < num_experts
  safe = jnp.minimum(sorted_expert, num_experts - 1)
  rank = jnp.arange(t * k, dtype=jnp.int32) - start[safe]
  row_sorted = jnp.where(is_real, padded_start[safe] + rank, r)  # [T*K]
  row_of_slot = jnp.zeros((t * k,), jnp.int32).at[order].set(row_sorted)
  token_of_row = jnp.full((r,), t, jnp.int32).at[row_sorted].set(
      order // k, mode='drop')
  slot_of_row = jnp.full((r,), t * k, jnp.int32).at[row_sorted].set(
      order, mode='drop')
  return DispatchState(row_of_slot.reshape(t, k), token_of_row, slot_of_row,
                       padded.astype(jnp.int32), sizes.astype(jnp.int32))


def take_rows(a: Array, index: Array) -> Array:
  """a[index] along axis 0, with 0 for out-of-range indices (padding, sentinels).

  mode='fill' avoids concatenating a zero row, which would copy all of `a`.
  """
  return jnp.take(a, index, axis=0, mode='fill', fill_value=0)


@jax.custom_vjp
def _gather_rows(x, token_of_row, row_of_slot):
  return take_rows(x, token_of_row)


def _gather_rows_fwd(x, token_of_row, row_of_slot):
  return _gather_rows(x, token_of_row, row_of_slot), (token_of_row, row_of_slot)


def sum_slot_rows(rows: Array, row_of_slot: Array,
                   weight: Array | None = None) -> Array:
  """Σ_k weight[t, k] rows[row_of_slot[t, k]] -> [T, D].

  One gather per slot column, summed in a Python loop over K: XLA fuses the K
  gathers and the multiply-adds into one pass that writes only [T, D], where
  a single [T, K, D] gather followed by a reduction materialises K times more
  memory (about 4x slower on CPU at the 154M shape).
  """
  out = None
  for k in range(row_of_slot.shape[1]):
    term = take_rows(rows, row_of_slot[:, k])                     # [T, D]
    if weight is not None:
      term = term * weight[:, k, None].astype(rows.dtype)
    out = term if out is None else out + term
  return out


def _gather_rows_bwd(res, d_rows):
  token_of_row, row_of_slot = res
  # Each token's gradient is the sum of its K rows: a gather, not a scatter.
  return sum_slot_rows(d_rows, row_of_slot), None, None


_gather_rows.defvjp(_gather_rows_fwd, _gather_rows_bwd)


def dispatch(x: Array, state: DispatchState) -> Array:
  """x [T, D] -> rows [R, D] in expert-sorted order (padding rows are 0)."""
  return _gather_rows(x, state.token_of_row, state.row_of_slot)


@jax.custom_vjp
def _combine(rows, weight, row_of_slot, token_of_row, slot_of_row):
  return sum_slot_rows(rows, row_of_slot, weight)                 # [T, D]


def _combine_fwd(rows, weight, row_of_slot, token_of_row, slot_of_row):
  out = _combine(rows, weight, row_of_slot, token_of_row, slot_of_row)
  return out, (rows, weight, row_of_slot, token_of_row, slot_of_row)


def _combine_bwd(res, dy):
  rows, weight, row_of_slot, token_of_row, slot_of_row = res
  dy = dy.astype(rows.dtype)
  # d rows[r] = w[slot(r)] * dy[token(r)]; padding rows read the zero pads.
  w_of_row = take_rows(weight.reshape(-1), slot_of_row)           # [R]
  dy_rows = take_rows(dy, token_of_row)                           # [R, D]
  d_rows = dy_rows * w_of_row[:, None].astype(rows.dtype)
  # d w[t, k] = <dy[t], rows[row(t, k)]>: one dot per row from the dy rows
  # gathered above, then a gather of scalars (no second [T, K, D] gather).
  dw_of_row = jnp.sum(dy_rows * rows, axis=-1, dtype=jnp.float32)  # [R]
  d_weight = take_rows(dw_of_row, row_of_slot).astype(weight.dtype)
  return d_rows, d_weight, None, None, None


_combine.defvjp(_combine_fwd, _combine_bwd)


def combine(rows: Array, weight: Array, state: DispatchState) -> Array:
  """y[t] = Σ_k weight[t, k] rows[row(t, k)]: rows [R, D], weight [T, K] -> [T, D]."""
  return _combine(rows, weight, state.row_of_slot, state.token_of_row,
                  state.slot_of_row)


# ----------------------------------------------------------- capacity mode ---

@struct.dataclass
class CapacityPlan:
  """GShard dispatch / combine tensors.

  Attributes:
    dispatch_mask: [T, E, C] 0/1, token t occupies position c of expert e.
    combine_weight: [T, E, C] the routing weight at that position.
    dropped: scalar int32, FFN slots that found their expert full.
  """

  dispatch_mask: Array
  combine_weight: Array
  dropped: Array


def capacity(num_tokens: int, top_k: int, num_experts: int,
             capacity_factor: float) -> int:
  return max(1, math.ceil(capacity_factor * num_tokens * top_k / num_experts))


def plan_capacity(expert_index: Array, weight: Array, num_experts: int,
                  capacity_factor: float) -> CapacityPlan:
  """expert_index, weight [T, K] -> one-hot tensors; slot-major priority."""
  t, k = expert_index.shape
  c = capacity(t, k, num_experts, capacity_factor)
  onehot = jax.nn.one_hot(expert_index.T, num_experts, dtype=jnp.int32)  # [K, T, E]
  # Position of each slot in its expert's queue: slots 0 of all tokens first.
  position = jnp.cumsum(onehot.reshape(k * t, num_experts), axis=0) - 1
  position = position.reshape(k, t, num_experts)
  keep = (onehot == 1) & (position < c)                          # [K, T, E]
  pos_onehot = jax.nn.one_hot(jnp.where(keep, position, c), c)   # [K, T, E, C]
  mask = jnp.sum(pos_onehot, axis=0)                             # [T, E, C]
  weights = jnp.einsum('ktec,tk->tec', pos_onehot, weight.astype(jnp.float32))
  is_ffn = expert_index < num_experts
  dropped = jnp.sum(is_ffn) - jnp.sum(keep)
  return CapacityPlan(mask, weights, dropped.astype(jnp.int32))


def dispatch_capacity(x: Array, cap: CapacityPlan) -> Array:
  """x [T, D] -> per-expert buffers [E, C, D]."""
  return jnp.einsum('tec,td->ecd', cap.dispatch_mask.astype(x.dtype), x)


def combine_capacity(y: Array, cap: CapacityPlan) -> Array:
  """Per-expert outputs [E, C, D] -> [T, D], weighted."""
  return jnp.einsum('tec,ecd->td', cap.combine_weight.astype(y.dtype), y)
