"""The grouped-matmul backends of the expert FFN, in one table.

A backend is a grouped matmul gmm(x [R, D], w [E, D, F], group_sizes [E])
-> [R, F] (rows sorted by expert, group e owning group_sizes[e] consecutive
rows), the row padding dispatch must give it, and optionally a fused
dispatch + FFN + combine. `moe.backend` picks one by name:
  'loop'       reference: every expert over all rows, masked (O(E) work).
  'ragged_dot' jax.lax.ragged_dot (a dense expansion on CPU).
  'blocked'    block-sparse while-loop grouped matmul (blocked_gmm.py); the
               layer runs its fused gather + FFN + combine, the fast XLA path
               on CPU.
  'pallas'     the Pallas kernel of kernels_pallas/gmm.py (Triton lowering
               on a GPU; Pallas interpret mode elsewhere, logged once).
The kernels package imports only JAX; its adapter to this contract lives
here, so model code never imports Pallas directly.

Dimension legend: R rows, D input width, F output width, E experts.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp

from kernels_pallas import gmm as pallas_gmm
from moe_jax.moe import blocked_gmm

Array = jax.Array


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


def gmm_pallas(x: Array, w: Array, group_sizes: Array) -> Array:
  """The Pallas kernel: differentiable in x and w (custom VJP: dlhs =
  gmm(grad, w^T), dw = tgmm(x, grad)), float32 accumulation, x's dtype out.

  It masks group boundaries inside a tile, so it needs no row padding; rows
  past sum(group_sizes) come out as 0.
  """
  return pallas_gmm.grouped_matmul(x, w, group_sizes,
                                   preferred_element_type=x.dtype)


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
    'pallas': Backend(gmm_pallas, row_alignment=1, row_multiple=1),
}


def get_backend(name: str) -> Backend:
  if name not in BACKENDS:
    raise ValueError(
        f'backend: expected one of {sorted(BACKENDS)}, got {name!r}')
  return BACKENDS[name]
