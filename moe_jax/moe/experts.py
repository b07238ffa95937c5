"""Grouped expert FFNs over dispatched rows, with interchangeable backends.

An expert is a 2-layer MLP: y = act(x W_in [+ b_in]) W_out [+ b_out], with
act one of 'relu' (LibMoE LM, bias-free), 'gelu' (erf), 'gelu_tanh' (SigLIP,
Phi MLPs), or 'swiglu' (Llama: silu(x W_gate) * (x W_up), W_in = [W_gate | W_up]).
Experts know nothing about routing: they see rows sorted by expert and the
group sizes. The grouped matmul is chosen by one string:
  'loop'       reference: every expert over all rows, masked (O(E) work).
  'ragged_dot' jax.lax.ragged_dot.
  'blocked'    block-sparse while-loop grouped matmul (blocked_gmm.py); the
               layer runs its fused gather + FFN + combine, the fast XLA path
               on CPU.
  'pallas'     the Pallas kernel (kernels_pallas), when installed.

Dimension legend: R rows, D model width, F expert hidden width, E experts,
C capacity.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe_jax.moe import blocked_gmm
from moe_jax.moe import dispatch as dispatch_lib

Array = jax.Array

ACTIVATIONS = ('relu', 'gelu', 'gelu_tanh', 'swiglu')


@dataclasses.dataclass(frozen=True)
class Backend:
  """A grouped matmul gmm(x [R, D], w [E, D, F], group_sizes [E]) -> [R, F].

  row_alignment: dispatch pads every group to a multiple of this.
  row_multiple: R must also be a multiple of row_alignment * row_multiple.
  """

  gmm: Callable[[Array, Array, Array], Array]
  row_alignment: int = 1
  row_multiple: int = 1
  # Optional dispatch + FFN + combine in one op:
  # moe_ffn(params, x [T, D], weight [T, K], token_of_row, slot_of_row,
  #         row_of_slot, group_sizes, activation=...) -> y [T, D].
  moe_ffn: Callable[..., Array] | None = None


def gmm_loop(x: Array, w: Array, group_sizes: Array) -> Array:
  """Reference grouped matmul: each expert over every row, masked to its group."""
  ends = jnp.cumsum(group_sizes)
  starts = ends - group_sizes
  row = jnp.arange(x.shape[0])
  out = jnp.zeros((x.shape[0], w.shape[-1]), jnp.float32)
  for e in range(w.shape[0]):
    in_group = (row >= starts[e]) & (row < ends[e])
    y = jnp.einsum('rd,df->rf', x, w[e], preferred_element_type=jnp.float32)
    out = out + jnp.where(in_group[:, None], y, 0.0)
  return out.astype(x.dtype)


def gmm_ragged_dot(x: Array, w: Array, group_sizes: Array) -> Array:
  return jax.lax.ragged_dot(x, w, group_sizes,
                            preferred_element_type=jnp.float32).astype(x.dtype)


# Block size and blocks per iteration of the blocked backend, tuned on the
# 154M layer shape on 2 CPU cores (python -m moe_jax.bench.layer --sweep).
BLOCK_ROWS = 128
BLOCKS_PER_STEP = 2

BACKENDS: dict[str, Backend] = {
    'loop': Backend(gmm_loop),
    'ragged_dot': Backend(gmm_ragged_dot),
    'blocked': Backend(
        functools.partial(blocked_gmm.gmm_blocked, block_rows=BLOCK_ROWS,
                          blocks_per_step=BLOCKS_PER_STEP),
        row_alignment=BLOCK_ROWS, row_multiple=BLOCKS_PER_STEP,
        moe_ffn=functools.partial(
            blocked_gmm.moe_ffn_blocked, block_rows=BLOCK_ROWS,
            blocks_per_step=BLOCKS_PER_STEP)),
}


def register_backend(name: str, backend: Backend) -> None:
  """Adds a grouped-matmul backend (the Pallas kernel registers itself here)."""
  BACKENDS[name] = backend


def get_backend(name: str) -> Backend:
  if name == 'pallas' and name not in BACKENDS:
    try:
      import kernels_pallas.backend  # noqa: F401  (registers 'pallas')
    except ImportError as e:
      raise ValueError(f"backend: 'pallas' is not available ({e})") from e
  if name not in BACKENDS:
    raise ValueError(f'backend: expected one of {sorted(BACKENDS)}, got {name!r}')
  return BACKENDS[name]


def check_activation(activation: str) -> None:
  if activation not in ACTIVATIONS:
    raise ValueError(
        f'activation: expected one of {ACTIVATIONS}, got {activation!r}')


def apply_activation(h: Array, activation: str) -> Array:
  """[..., F] (or [..., 2F] for swiglu) -> [..., F]."""
  if activation == 'relu':
    return jax.nn.relu(h)
  if activation == 'gelu':
    return jax.nn.gelu(h, approximate=False)
  if activation == 'gelu_tanh':
    return jax.nn.gelu(h, approximate=True)
  if activation == 'swiglu':
    gate, up = jnp.split(h, 2, axis=-1)
    return jax.nn.silu(gate) * up
  raise ValueError(f'activation: expected one of {ACTIVATIONS}, got {activation!r}')


def expert_of_row(group_sizes: Array, num_rows: int) -> Array:
  """[R] int32 expert owning each row (rows past the groups: the last expert)."""
  ends = jnp.cumsum(group_sizes)
  e = jnp.searchsorted(ends, jnp.arange(num_rows), side='right')
  return jnp.minimum(e, group_sizes.shape[0] - 1)


def grouped_ffn(params: dict, rows: Array, group_sizes: Array, *,
                activation: str, backend: Backend) -> Array:
  """Expert FFN over dispatched rows.

  Args:
    params: w_in [E, D, F] ([E, D, 2F] for swiglu), w_out [E, F, D], optional
      b_in [E, F or 2F] and b_out [E, D].
    rows: [R, D] rows sorted by expert (dispatch.dispatch).
    group_sizes: [E] int32 rows per expert.
  Returns:
    [R, D]; rows outside every group hold junk the combine never reads.
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

  x [T, D], weight [T, K] -> [T, D]. Backends with a fused `moe_ffn` do the
  gather, the FFN and the combine in one op; the others go through
  dispatch.dispatch -> grouped_ffn -> dispatch.combine. Same result either way.
  """
  if backend.moe_ffn is not None:
    return backend.moe_ffn(params, x, weight, plan.token_of_row,
                           plan.slot_of_row, plan.row_of_slot,
                           plan.group_sizes, activation=activation)
  rows = dispatch_lib.dispatch(x, plan)                        # [R, D]
  rows = grouped_ffn(params, rows, plan.group_sizes, activation=activation,
                     backend=backend)
  return dispatch_lib.combine(rows, weight, plan)


def batched_ffn(params: dict, x: Array, *, activation: str) -> Array:
  """Expert FFN over capacity buffers x [E, C, D] -> [E, C, D]."""
  h = jnp.einsum('ecd,edf->ecf', x, params['w_in'].astype(x.dtype))
  if 'b_in' in params:
    h = h + params['b_in'][:, None, :].astype(h.dtype)
  h = apply_activation(h, activation)
  y = jnp.einsum('ecf,efd->ecd', h, params['w_out'].astype(x.dtype))
  if 'b_out' in params:
    y = y + params['b_out'][:, None, :].astype(y.dtype)
  return y


def dense_ffn(params: dict, x: Array, *, activation: str) -> Array:
  """One FFN (shared expert or dense baseline): x [T, D] -> [T, D]."""
  h = x @ params['w_in'].astype(x.dtype)
  if 'b_in' in params:
    h = h + params['b_in'].astype(h.dtype)
  y = apply_activation(h, activation) @ params['w_out'].astype(x.dtype)
  if 'b_out' in params:
    y = y + params['b_out'].astype(y.dtype)
  return y


def ffn_param_shapes(num_experts: int | None, d_model: int, width: int,
                     activation: str) -> dict[str, tuple[int, ...]]:
  """Shapes of the FFN weights; num_experts None gives a single FFN."""
  lead = () if num_experts is None else (num_experts,)
  w_in = 2 * width if activation == 'swiglu' else width
  return {'w_in': lead + (d_model, w_in), 'w_out': lead + (width, d_model),
          'b_in': lead + (w_in,), 'b_out': lead + (d_model,)}


class FFNParams(nn.Module):
  """Owns FFN weights (one FFN, or E stacked experts) with logical axis names."""

  num_experts: int | None
  d_model: int
  width: int
  activation: str
  use_bias: bool
  w_in_std: float
  w_out_std: float

  @nn.compact
  def __call__(self) -> dict:
    shapes = ffn_param_shapes(self.num_experts, self.d_model, self.width,
                              self.activation)
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
