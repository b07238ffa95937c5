"""Grouped expert FFNs over dispatched rows, with interchangeable backends.

An expert is a 2-layer MLP: y = act(x W_in [+ b_in]) W_out [+ b_out], with
act one of activations.ACTIVATIONS. Experts know nothing about routing: they
see rows sorted by expert and the group sizes, and run the grouped matmul of
a backend (backends.py: loop | ragged_dot | blocked | pallas).

Dimension legend: R rows, D model (input) width, D' output width (d_out,
D unless set: a projector maps D -> D'), F expert hidden width, E experts,
C capacity.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe_jax.moe import dispatch as dispatch_lib
from moe_jax.moe.activations import apply_activation
from moe_jax.moe.backends import Backend

Array = jax.Array


def expert_of_row(group_sizes: Array, num_rows: int) -> Array:
  """[R] int32 expert owning each row (rows past the groups: the last expert)."""
  ends = jnp.cumsum(group_sizes)
  e = jnp.searchsorted(ends, jnp.arange(num_rows), side='right')
  return jnp.minimum(e, group_sizes.shape[0] - 1)


def grouped_ffn(params: dict, rows: Array, group_sizes: Array, *,
                activation: str, backend: Backend) -> Array:
  """Expert FFN over dispatched rows.

  Args:
    params: w_in [E, D, F] ([E, D, 2F] for swiglu), w_out [E, F, D'],
      optional b_in [E, F or 2F] and b_out [E, D'].
    rows: [R, D] rows sorted by expert (dispatch.dispatch).
    group_sizes: [E] int32 rows per expert.
  Returns:
    [R, D']; rows outside every group hold junk the combine never reads.
  """
  h = backend.gmm(rows, params['w_in'].astype(rows.dtype), group_sizes)
  owner = None
  if 'b_in' in params:
    owner = expert_of_row(group_sizes, rows.shape[0])
    h = h + params['b_in'][owner].astype(h.dtype)
  h = apply_activation(h, activation)
  y = backend.gmm(h, params['w_out'].astype(rows.dtype), group_sizes)
  if 'b_out' in params:
    y = y + params['b_out'][owner].astype(y.dtype)
  return y


def routed_ffn(params: dict, x: Array, weight: Array,
               plan: dispatch_lib.DispatchState, *, activation: str,
               backend: Backend) -> Array:
  """y[t] = Σ_k weight[t, k] FFN_{expert(t, k)}(x[t]) for a dispatch plan.

  x [T, D], weight [T, K] -> [T, D']. Backends with a fused `moe_ffn` do the
  gather, the FFN and the combine in one op; the others go through
  dispatch.dispatch -> grouped_ffn -> dispatch.combine. Same result either way.
  """
  if backend.moe_ffn is not None:
    return backend.moe_ffn(params, x, weight, plan.token_of_row,
                           plan.slot_of_row, plan.row_of_slot,
                           plan.group_sizes, activation=activation)
  rows = dispatch_lib.dispatch(x, plan)                        # [R, D]
  rows = grouped_ffn(params, rows, plan.group_sizes, activation=activation,
                     backend=backend)                           # [R, D']
  return dispatch_lib.combine(rows, weight, plan)


def batched_ffn(params: dict, x: Array, *, activation: str) -> Array:
  """Expert FFN over capacity buffers x [E, C, D] -> [E, C, D']."""
  h = jnp.einsum('ecd,edf->ecf', x, params['w_in'].astype(x.dtype))
  if 'b_in' in params:
    h = h + params['b_in'][:, None, :].astype(h.dtype)
  h = apply_activation(h, activation)
  y = jnp.einsum('ecf,efd->ecd', h, params['w_out'].astype(x.dtype))
  if 'b_out' in params:
    y = y + params['b_out'][:, None, :].astype(y.dtype)
  return y


def dense_ffn(params: dict, x: Array, *, activation: str) -> Array:
  """One FFN (shared expert or dense baseline): x [T, D] -> [T, D']."""
  h = x @ params['w_in'].astype(x.dtype)
  if 'b_in' in params:
    h = h + params['b_in'].astype(h.dtype)
  y = apply_activation(h, activation) @ params['w_out'].astype(x.dtype)
  if 'b_out' in params:
    y = y + params['b_out'].astype(y.dtype)
  return y


def ffn_param_shapes(num_experts: int | None, d_model: int, width: int,
                     activation: str, d_out: int | None = None
                     ) -> dict[str, tuple[int, ...]]:
  """Shapes of the FFN weights; num_experts None gives a single FFN.

  d_out: the output width D' (None: d_model).
  """
  lead = () if num_experts is None else (num_experts,)
  w_in = 2 * width if activation == 'swiglu' else width
  out = d_model if d_out is None else d_out
  return {'w_in': lead + (d_model, w_in), 'w_out': lead + (width, out),
          'b_in': lead + (w_in,), 'b_out': lead + (out,)}


class FFNParams(nn.Module):
  """Owns FFN weights (one FFN, or E stacked experts) with logical axis names."""

  num_experts: int | None
  d_model: int
  width: int
  activation: str
  use_bias: bool
  w_in_std: float
  w_out_std: float
  # Output width D'; None means d_model.
  d_out: int | None = None

  @nn.compact
  def __call__(self) -> dict:
    shapes = ffn_param_shapes(self.num_experts, self.d_model, self.width,
                              self.activation, self.d_out)
    lead = () if self.num_experts is None else ('expert',)
    normal = lambda std: nn.initializers.normal(stddev=std)
    params = {
        'w_in': self.param('w_in', nn.with_logical_partitioning(
            normal(self.w_in_std), lead + ('embed', 'mlp')), shapes['w_in']),
        'w_out': self.param('w_out', nn.with_logical_partitioning(
            normal(self.w_out_std), lead + ('mlp', 'embed')), shapes['w_out']),
    }
    if self.use_bias:
      params['b_in'] = self.param('b_in', nn.with_logical_partitioning(
          nn.initializers.zeros, lead + ('mlp',)), shapes['b_in'])
      params['b_out'] = self.param('b_out', nn.with_logical_partitioning(
          nn.initializers.zeros, lead + ('embed',)), shapes['b_out'])
    return jax.tree.map(lambda p: p.unbox() if hasattr(p, 'unbox') else p,
                        params, is_leaf=lambda p: hasattr(p, 'unbox'))
