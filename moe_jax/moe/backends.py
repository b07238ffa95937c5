"""The grouped-matmul backends of the expert FFN, in one table.

A backend is a grouped matmul gmm(x [R, D], w [E, D, F], group_sizes [E])
-> [R, F] (rows sorted by expert, group e owning group_sizes[e] consecutive
rows), the row padding dispatch must give it, and optionally a fused
dispatch + FFN + combine. `moe.backend` picks one by name:
  'loop'       reference: every expert over all rows, masked (O(E) work).
  'ragged_dot' jax.lax.ragged_dot (a dense expansion on CPU).
  'blocked'    block-sparse while-loop grouped matmul (blocked_gmm.py); the
               layer runs its fused gather + FFN + combine, the fast XLA path
               on CPU. Its block size follows the rows per expert T*K/E
               (blocked_block_rows), through Backend.for_dispatch.
  'pallas'     the Pallas kernel of kernels_pallas/gmm.py (Triton lowering
               on a GPU; Pallas interpret mode elsewhere, logged once).
The kernels package imports only JAX; its adapter to this contract lives
here, so model code never imports Pallas directly.

Dimension legend: R rows, D input width, F output width, E experts.
"""

from __future__ import annotations

import dataclasses
import functools
import math
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
  # Optional shape rule: sized(num_slots, num_experts) -> this backend with
  # tiles for about num_slots / num_experts rows per expert.
  sized: Callable[[int, int], Backend] | None = None

  def for_dispatch(self, num_slots: int, num_experts: int) -> Backend:
    """This backend tiled for num_slots (token, slot) rows over num_experts.

    Call it where the dispatch plan is made and use the returned backend for
    both the plan (row_alignment, row_multiple) and the FFN, so the row
    padding and the kernel's block size come from one object. Static: the
    arguments are trace-time shapes. Backends without a rule return self.
    """
    return self if self.sized is None else self.sized(num_slots, num_experts)


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


# Tiles of the blocked backend. Every group is padded to whole blocks, so a
# block much larger than an expert's rows is mostly padding: at 128 tokens of
# the 154M layer (T*K/E = 15.5 rows per expert) 128-row blocks multiply 8x
# more rows than there are. The block is therefore the expected rows per
# expert T*K/E rounded to a power of two in [MIN_BLOCK_ROWS, MAX_BLOCK_ROWS],
# two blocks per loop iteration. Tuned on the 154M layer shape (E 66, k 8,
# d 512, m 128, relu), 2 CPU cores, at 64 to 4096 tokens: 16-row blocks beat
# 32 and 64 at 128 tokens (8 was no faster even at 64 tokens), 64 beat 32 and
# 128 at 512, 128 stays best at 4096; 4 or 8 blocks per step were no faster.
MIN_BLOCK_ROWS = 16
MAX_BLOCK_ROWS = 128
BLOCKS_PER_STEP = 2
# The block of the unsized `blocked` backend (direct gmm calls, and dispatch
# plans made without for_dispatch).
BLOCK_ROWS = MAX_BLOCK_ROWS


def blocked_block_rows(num_slots: int, num_experts: int) -> int:
  """Rows per block of the blocked backend for a dispatch (static shapes).

  Args:
    num_slots: T*K (token, slot) pairs dispatched.
    num_experts: E experts they are spread over.
  Returns:
    BM: the expected rows per expert T*K/E rounded to the nearest power of
    two (on a log scale), clamped to [MIN_BLOCK_ROWS, MAX_BLOCK_ROWS].
  """
  rows_per_expert = max(num_slots, 1) / max(num_experts, 1)
  nearest = 1 << max(0, round(math.log2(rows_per_expert)))
  return min(MAX_BLOCK_ROWS, max(MIN_BLOCK_ROWS, nearest))


@functools.lru_cache(maxsize=None)
def blocked_backend(block_rows: int = BLOCK_ROWS,
                    blocks_per_step: int = BLOCKS_PER_STEP) -> Backend:
  """The blocked backend with BM-row blocks, G blocks per loop iteration.

  Its row alignment is BM and its row multiple G (blocked_gmm.py); its shape
  rule picks BM with blocked_block_rows.
  """
  return Backend(
      functools.partial(blocked_gmm.gmm_blocked, block_rows=block_rows,
                        blocks_per_step=blocks_per_step),
      row_alignment=block_rows, row_multiple=blocks_per_step,
      moe_ffn=functools.partial(
          blocked_gmm.moe_ffn_blocked, block_rows=block_rows,
          blocks_per_step=blocks_per_step),
      sized=lambda num_slots, num_experts: blocked_backend(
          blocked_block_rows(num_slots, num_experts), blocks_per_step))


BACKENDS: dict[str, Backend] = {
    'loop': Backend(gmm_loop),
    'ragged_dot': Backend(gmm_ragged_dot),
    'blocked': blocked_backend(),
    'pallas': Backend(gmm_pallas, row_alignment=1, row_multiple=1),
}


def get_backend(name: str) -> Backend:
  if name not in BACKENDS:
    raise ValueError(
        f'backend: expected one of {sorted(BACKENDS)}, got {name!r}')
  return BACKENDS[name]
