"""Grouped matmul (gmm), its weight-gradient form (tgmm) and their custom VJP.

Rows of `lhs` are sorted by group: group g owns the `group_sizes[g]`
consecutive rows that follow group g-1 (dropless MoE experts after a sort by
expert id). Rows past sum(group_sizes) belong to no group.

  gmm(lhs [M, K], rhs [G, K, N], group_sizes [G]) -> [M, N]
      out[r] = lhs[r] @ rhs[g(r)]; rows past sum(group_sizes) are 0.
  tgmm(lhs [M, K], grad [M, N], group_sizes [G]) -> [G, K, N]
      out[g] = lhs[rows of g]^T @ grad[rows of g]; empty groups give 0.
  grouped_matmul: gmm with a custom VJP, dlhs = gmm(grad, rhs^T) and
      drhs = tgmm(lhs, grad) (Pallas calls cannot be autodiffed).

Kernels: Pallas with the Triton lowering (`jax.experimental.pallas.triton`).
The Mosaic GPU interpreter of jax 0.10 cannot read transposed WGMMA operands
(`TransposeTransform` has no indices), which tgmm and dlhs need, so a Mosaic
GPU kernel could not be tested on CPU; the generic Pallas interpreter runs
these Triton kernels unchanged (`interpret=True`).

gmm uses the group-metadata tile grid of Megablox / ragged_dot_mgpu
(performance.md §3.3, §8): the row tiles of [0, M) are visited once per group
that overlaps them, cdiv(M, bm) + G tiles at most (G - 1 boundaries inside a
tile, plus one tail pseudo-group that zeroes rows past sum(group_sizes)).
Each tile knows its group and masks the rows outside it, so no row is padded
and no group costs more than one extra tile.

Dimension legend: M rows (tokens x top-k after dispatch), K contraction width,
N output width, G groups (experts); bm, bk, bn tile sizes; T tile-grid size.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

Array = jax.Array
DType = Any

_LOG = logging.getLogger(__name__)
_interpret_logged = False

# Shared memory the tile table plans for the software pipeline: H100 has
# 227 KiB per block; keep headroom for Triton's own scratch (layout
# conversions, epilogue), e.g. 3 stages of 128 x 256 x 64 bf16.
_SMEM_BUDGET = 160 * 1024


@dataclasses.dataclass(frozen=True)
class Tiling:
  """Tile sizes and Triton launch parameters of one kernel call.

  gmm: a [block_m, block_n] output tile, reduced over K in steps of block_k.
  tgmm: a [block_k, block_n] tile of out[g], reduced over the group's rows in
  steps of block_m. Every block is a power of two >= 16 (Triton's tl.dot).
  """

  block_m: int
  block_k: int
  block_n: int
  num_warps: int = 4
  num_stages: int = 3
  # gmm only: row tiles per L2 swizzle group (tiles that share rhs columns run
  # together, Triton's GROUP_SIZE_M).
  group_m: int = 8

  def __post_init__(self):
    for name in ('block_m', 'block_k', 'block_n'):
      b = getattr(self, name)
      if b < 16 or b & (b - 1):
        raise ValueError(f'{name}: expected a power of two >= 16, got {b}')
    if self.group_m < 1:
      raise ValueError(f'group_m: expected >= 1, got {self.group_m}')


def _pow2_at_least(x: int) -> int:
  return max(16, 1 << max(0, (int(x) - 1).bit_length()))


def choose_tiling(m: int, k: int, n: int, dtype: DType, *,
                  num_groups: int = 1, op: str = 'gmm') -> Tiling:
  """Tile table for H100 (bf16/f16 on tensor cores; f32 in IEEE precision).

  A starting point from the usual Hopper Triton matmul configurations
  (128 x 256 x 64, 8 warps, 3 stages for bf16), not tuned on a device: tune it
  with `python -m kernels_pallas.bench` on the GPU.

  Args:
    m: rows of lhs (all groups together).
    k: contraction width for gmm; the K of out [G, K, N] for tgmm.
    n: output width.
    dtype: input dtype.
    num_groups: G, to size row tiles by the average group.
    op: 'gmm' (also dlhs) or 'tgmm'.
  Returns:
    A Tiling; each block is at most the next power of two of its dimension
    (small shapes get small tiles).
  """
  if op not in ('gmm', 'tgmm'):
    raise ValueError(f"op: expected 'gmm' or 'tgmm', got {op!r}")
  itemsize = jnp.dtype(dtype).itemsize
  wide = itemsize <= 2
  rows_per_group = m / max(num_groups, 1)
  if op == 'gmm':
    # Each group boundary costs one partly used row tile: smaller row tiles
    # for small groups (performance.md §2, tile-padding waste).
    bm = 128 if rows_per_group >= 512 else 64
    bn = (256 if n >= 2048 else 128) if wide else 128
    bk = 64 if wide else 32
  else:
    # The reduction runs over a group's rows, so block_m is the K-step.
    bm = 64 if wide else 32
    bk = 128
    bn = (256 if n >= 2048 else 128) if wide else 64
  # Row tiles stay >= 64 (one Hopper warpgroup MMA) unless M itself is small.
  bm = min(bm, _pow2_at_least(m))
  bk = min(bk, _pow2_at_least(k))
  bn = min(bn, _pow2_at_least(n))
  warps = 8 if (bm if op == 'gmm' else bk) * bn >= 128 * 256 else 4
  if op == 'gmm':
    stage_bytes = (bm * bk + bk * bn) * itemsize
  else:
    stage_bytes = (bm * bk + bm * bn) * itemsize
  stages = max(1, min(4, _SMEM_BUDGET // stage_bytes))
  return Tiling(bm, bk, bn, num_warps=warps, num_stages=stages)


def _resolve_interpret(interpret: bool | None) -> bool:
  """None: interpret exactly when no GPU backs JAX (logged once)."""
  global _interpret_logged
  if interpret is not None:
    return bool(interpret)
  on_gpu = jax.default_backend() == 'gpu'
  if not on_gpu and not _interpret_logged:
    _interpret_logged = True
    _LOG.warning(
        'kernels_pallas: no GPU (backend %r); the Pallas grouped matmul runs '
        'in interpret mode (correct but slow, meant for tests).',
        jax.default_backend())
  return not on_gpu


def _compiler_params(tiling: Tiling):
  return pltriton.CompilerParams(num_warps=tiling.num_warps,
                                 num_stages=tiling.num_stages)


def _cdiv(a: int, b: int) -> int:
  return -(-a // b)


# ---------------------------------------------------------------------------
# Group metadata.


@dataclasses.dataclass(frozen=True)
class GroupMetadata:
  """Which group and row tile each of the T grid tiles of gmm works on.

  Groups 0..G-1 are the real groups; group G is the tail [sum(sizes), M),
  whose tiles write zeros. Tiles t >= num_tiles do nothing.
  """

  starts: Array      # [G + 1] int32 first row of each group
  ends: Array        # [G + 1] int32 one past its last row
  tile_group: Array  # [T] int32 group of tile t
  tile_block: Array  # [T] int32 row tile (rows bm * block ...) of tile t
  num_tiles: Array   # [1] int32 tiles in use


def num_grid_tiles(m: int, num_groups: int, block_m: int) -> int:
  """Static upper bound T on the tiles: cdiv(M, bm) + G.

  The G + 1 groups (tail included) partition [0, M); a group spanning row
  tiles a..b takes b - a + 1 tiles, so the total is at most the number of
  row tiles plus one per boundary between non-empty groups.
  """
  return _cdiv(m, block_m) + num_groups


def make_group_metadata(group_sizes: Array, m: int,
                        block_m: int) -> GroupMetadata:
  """Tile metadata for gmm (Megablox make_group_metadata, plus the tail).

  Args:
    group_sizes: [G] int rows per group; sums past M are clipped to M.
    m: rows of lhs.
    block_m: row tile bm.
  """
  g = group_sizes.shape[0]
  ends = jnp.minimum(jnp.cumsum(group_sizes.astype(jnp.int32)), m)
  starts = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends[:-1]])
  starts = jnp.concatenate([starts, ends[-1:]])                   # [G + 1]
  ends = jnp.concatenate([ends, jnp.full((1,), m, jnp.int32)])    # [G + 1]
  first = starts // block_m
  last = (ends - 1) // block_m
  tiles = jnp.where(ends > starts, last - first + 1, 0)           # [G + 1]
  tile_end = jnp.cumsum(tiles)
  tile_start = tile_end - tiles
  t = jnp.arange(num_grid_tiles(m, g, block_m), dtype=jnp.int32)  # [T]
  tile_group = jnp.searchsorted(tile_end, t, side='right').astype(jnp.int32)
  tile_group = jnp.minimum(tile_group, g)
  tile_block = first[tile_group] + t - tile_start[tile_group]
  return GroupMetadata(starts, ends, tile_group, tile_block.astype(jnp.int32),
                       tile_end[-1:])


# ---------------------------------------------------------------------------
# gmm.


def _gmm_kernel(tile_group_ref, tile_block_ref, starts_ref, ends_ref,
                num_tiles_ref, lhs_ref, rhs_ref, out_ref, *, k: int, n: int,
                num_groups: int, grid_tiles: int, tiling: Tiling,
                transpose_rhs: bool, compute_dtype: DType):
  """One [bm, bn] output tile of one group (see GroupMetadata)."""
  bm, bk, bn = tiling.block_m, tiling.block_k, tiling.block_n
  n_tiles = _cdiv(n, bn)
  # L2 swizzle: group_m consecutive row tiles sweep the column tiles together.
  pid = pl.program_id(0)
  width = tiling.group_m * n_tiles
  first = (pid // width) * tiling.group_m
  height = jnp.minimum(grid_tiles - first, tiling.group_m)
  t = first + (pid % width) % height
  j = (pid % width) // height

  group = tile_group_ref[t]
  row0 = tile_block_ref[t] * bm
  rows = row0 + jnp.arange(bm, dtype=jnp.int32)
  in_group = (rows >= starts_ref[group]) & (rows < ends_ref[group])  # [bm]
  cols = j * bn + jnp.arange(bn, dtype=jnp.int32)
  col_ok = cols < n                                                  # [bn]
  out_mask = in_group[:, None] & col_ok[None, :]
  out_idx = (pl.ds(row0, bm), pl.ds(j * bn, bn))
  active = t < num_tiles_ref[0]

  @pl.when(active & (group < num_groups))
  def _():
    def step(kb, acc):
      kk = kb * bk + jnp.arange(bk, dtype=jnp.int32)
      k_ok = kk < k
      # Rows outside the group are not loaded (they may belong to rows past M
      # or hold anything); a partial K block reads zeros past K.
      x_mask = in_group[:, None]
      if k % bk:
        x_mask = x_mask & k_ok[None, :]
      x = pltriton.load(lhs_ref.at[pl.ds(row0, bm), pl.ds(kb * bk, bk)],
                        mask=x_mask, other=0)                        # [bm, bk]
      if transpose_rhs:
        # rhs [G, N, K]: a [bn, bk] tile, contracted on its second axis.
        w_mask = None
        if n % bn or k % bk:
          w_mask = col_ok[:, None] & k_ok[None, :]
        w = pltriton.load(
            rhs_ref.at[group, pl.ds(j * bn, bn), pl.ds(kb * bk, bk)],
            mask=w_mask, other=0 if w_mask is not None else None)
        dims = (((1,), (1,)), ((), ()))
      else:
        w_mask = None
        if n % bn or k % bk:
          w_mask = k_ok[:, None] & col_ok[None, :]
        w = pltriton.load(
            rhs_ref.at[group, pl.ds(kb * bk, bk), pl.ds(j * bn, bn)],
            mask=w_mask, other=0 if w_mask is not None else None)
        dims = (((1,), (0,)), ((), ()))
      return acc + jax.lax.dot_general(
          x.astype(compute_dtype), w.astype(compute_dtype), dims,
          preferred_element_type=jnp.float32)

    acc = jax.lax.fori_loop(0, _cdiv(k, bk), step,
                            jnp.zeros((bm, bn), jnp.float32))
    pltriton.store(out_ref.at[out_idx], acc.astype(out_ref.dtype),
                   mask=out_mask)

  @pl.when(active & (group == num_groups))
  def _():
    # Tail pseudo-group: rows past sum(group_sizes) are defined to be 0.
    pltriton.store(out_ref.at[out_idx], jnp.zeros((bm, bn), out_ref.dtype),
                   mask=out_mask)


@functools.partial(jax.jit, static_argnames=(
    'tiling', 'interpret', 'preferred_element_type', 'transpose_rhs'))
def _gmm(lhs, rhs, group_sizes, *, tiling, interpret, preferred_element_type,
         transpose_rhs):
  m, k = lhs.shape
  num_groups = rhs.shape[0]
  n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  if m == 0 or n == 0 or k == 0:
    # Nothing to launch; an empty contraction gives zeros.
    return jnp.zeros((m, n), preferred_element_type)
  meta = make_group_metadata(group_sizes, m, tiling.block_m)
  grid_tiles = num_grid_tiles(m, num_groups, tiling.block_m)
  kernel = functools.partial(
      _gmm_kernel, k=k, n=n, num_groups=num_groups,
      grid_tiles=grid_tiles, tiling=tiling, transpose_rhs=transpose_rhs,
      compute_dtype=jnp.promote_types(lhs.dtype, rhs.dtype))
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((m, n), preferred_element_type),
      grid=(grid_tiles * _cdiv(n, tiling.block_n),),
      compiler_params=_compiler_params(tiling),
      interpret=interpret,
      name='moe_gmm',
  )(meta.tile_group, meta.tile_block, meta.starts, meta.ends, meta.num_tiles,
    lhs, rhs)


def _check_group_sizes(group_sizes: Array, num_groups: int) -> None:
  if group_sizes.shape != (num_groups,):
    raise ValueError(f'group_sizes: expected shape ({num_groups},), got '
                     f'{group_sizes.shape}')
  if not jnp.issubdtype(group_sizes.dtype, jnp.integer):
    raise ValueError(f'group_sizes: expected an integer dtype, got '
                     f'{group_sizes.dtype}')


def gmm(lhs: Array, rhs: Array, group_sizes: Array, *,
        tiling: Tiling | None = None, interpret: bool | None = None,
        preferred_element_type: DType = jnp.float32,
        transpose_rhs: bool = False) -> Array:
  """Grouped matmul: rows of group g of lhs times rhs[g].

  Args:
    lhs: [M, K] rows sorted by group.
    rhs: [G, K, N] ([G, N, K] with transpose_rhs).
    group_sizes: [G] int rows per group; rows past their sum give 0.
    tiling: tiles and launch parameters; None picks them with choose_tiling.
    interpret: run the Pallas interpreter; None: exactly when JAX has no GPU.
    preferred_element_type: output dtype. Accumulation is always float32.
    transpose_rhs: multiply by rhs[g]^T (the dlhs of the VJP) without
      materialising the transpose.
  Returns:
    [M, N] in preferred_element_type.
  """
  if lhs.ndim != 2 or rhs.ndim != 3:
    raise ValueError(f'gmm: expected lhs [M, K] and rhs [G, K, N], got '
                     f'{lhs.shape} and {rhs.shape}')
  k_rhs = rhs.shape[2] if transpose_rhs else rhs.shape[1]
  if lhs.shape[1] != k_rhs:
    raise ValueError(f'gmm: contraction widths differ: lhs {lhs.shape}, rhs '
                     f'{rhs.shape} (transpose_rhs={transpose_rhs})')
  _check_group_sizes(group_sizes, rhs.shape[0])
  n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  if tiling is None:
    tiling = choose_tiling(lhs.shape[0], lhs.shape[1], n,
                           jnp.promote_types(lhs.dtype, rhs.dtype),
                           num_groups=rhs.shape[0], op='gmm')
  return _gmm(lhs, rhs, group_sizes, tiling=tiling,
              interpret=_resolve_interpret(interpret),
              preferred_element_type=jnp.dtype(preferred_element_type),
              transpose_rhs=transpose_rhs)


# ---------------------------------------------------------------------------
# tgmm.


def _tgmm_kernel(starts_ref, ends_ref, lhs_ref, grad_ref, out_ref, *, k: int,
                 n: int, tiling: Tiling, compute_dtype: DType):
  """One [bk, bn] tile of out[g], reduced over the rows of group g."""
  bm, bk, bn = tiling.block_m, tiling.block_k, tiling.block_n
  k_tiles, n_tiles = _cdiv(k, bk), _cdiv(n, bn)
  # Group-major order: the tiles of one group reuse its rows from L2.
  pid = pl.program_id(0)
  group = pid // (k_tiles * n_tiles)
  kb = (pid // n_tiles) % k_tiles
  j = pid % n_tiles
  start, end = starts_ref[group], ends_ref[group]
  kk = kb * bk + jnp.arange(bk, dtype=jnp.int32)
  cols = j * bn + jnp.arange(bn, dtype=jnp.int32)
  k_ok, col_ok = kk < k, cols < n

  def step(i, acc):
    r0 = start + i * bm
    # Rows of other groups or past M are masked to 0 on both operands, so junk
    # (even inf / nan) outside the group never reaches the sum.
    row_ok = (r0 + jnp.arange(bm, dtype=jnp.int32)) < end
    x_mask = row_ok[:, None] & k_ok[None, :] if k % bk else row_ok[:, None]
    y_mask = row_ok[:, None] & col_ok[None, :] if n % bn else row_ok[:, None]
    x = pltriton.load(lhs_ref.at[pl.ds(r0, bm), pl.ds(kb * bk, bk)],
                      mask=x_mask, other=0)                          # [bm, bk]
    y = pltriton.load(grad_ref.at[pl.ds(r0, bm), pl.ds(j * bn, bn)],
                      mask=y_mask, other=0)                          # [bm, bn]
    return acc + jax.lax.dot_general(
        x.astype(compute_dtype), y.astype(compute_dtype),
        (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)

  # An empty group runs no step and stores zeros.
  acc = jax.lax.fori_loop(0, (end - start + bm - 1) // bm, step,
                          jnp.zeros((bk, bn), jnp.float32))
  mask = None
  if k % bk or n % bn:
    mask = k_ok[:, None] & col_ok[None, :]
  pltriton.store(out_ref.at[group, pl.ds(kb * bk, bk), pl.ds(j * bn, bn)],
                 acc.astype(out_ref.dtype), mask=mask)


@functools.partial(jax.jit, static_argnames=(
    'num_groups', 'tiling', 'interpret', 'preferred_element_type'))
def _tgmm(lhs, grad, group_sizes, *, num_groups, tiling, interpret,
          preferred_element_type):
  m, k = lhs.shape
  n = grad.shape[1]
  if m == 0 or k == 0 or n == 0:
    return jnp.zeros((num_groups, k, n), preferred_element_type)
  ends = jnp.minimum(jnp.cumsum(group_sizes.astype(jnp.int32)), m)
  starts = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends[:-1]])
  kernel = functools.partial(
      _tgmm_kernel, k=k, n=n, tiling=tiling,
      compute_dtype=jnp.promote_types(lhs.dtype, grad.dtype))
  grid = num_groups * _cdiv(k, tiling.block_k) * _cdiv(n, tiling.block_n)
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((num_groups, k, n),
                                     preferred_element_type),
      grid=(grid,),
      compiler_params=_compiler_params(tiling),
      interpret=interpret,
      name='moe_tgmm',
  )(starts, ends, lhs, grad)


def tgmm(lhs: Array, grad: Array, group_sizes: Array, *,
         tiling: Tiling | None = None, interpret: bool | None = None,
         preferred_element_type: DType = jnp.float32) -> Array:
  """Per-group lhs^T @ grad: the weight gradient of gmm.

  Args:
    lhs: [M, K] rows sorted by group.
    grad: [M, N] same rows.
    group_sizes: [G] int rows per group; rows past their sum are ignored.
    tiling: see Tiling (block_m is the reduction step over rows); None picks
      it with choose_tiling(..., op='tgmm').
    interpret: run the Pallas interpreter; None: exactly when JAX has no GPU.
    preferred_element_type: output dtype. Accumulation is always float32.
  Returns:
    [G, K, N] in preferred_element_type; zeros for empty groups.
  """
  if lhs.ndim != 2 or grad.ndim != 2 or lhs.shape[0] != grad.shape[0]:
    raise ValueError(f'tgmm: expected lhs [M, K] and grad [M, N], got '
                     f'{lhs.shape} and {grad.shape}')
  if group_sizes.ndim != 1:
    raise ValueError(f'group_sizes: expected shape (G,), got '
                     f'{group_sizes.shape}')
  num_groups = group_sizes.shape[0]
  _check_group_sizes(group_sizes, num_groups)
  if tiling is None:
    tiling = choose_tiling(lhs.shape[0], lhs.shape[1], grad.shape[1],
                           jnp.promote_types(lhs.dtype, grad.dtype),
                           num_groups=num_groups, op='tgmm')
  return _tgmm(lhs, grad, group_sizes, num_groups=num_groups, tiling=tiling,
               interpret=_resolve_interpret(interpret),
               preferred_element_type=jnp.dtype(preferred_element_type))


# ---------------------------------------------------------------------------
# Differentiable op.


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _grouped_matmul(lhs, rhs, group_sizes, out_dtype, tiling, interpret):
  return gmm(lhs, rhs, group_sizes, tiling=tiling, interpret=interpret,
             preferred_element_type=out_dtype)


def _grouped_matmul_fwd(lhs, rhs, group_sizes, out_dtype, tiling, interpret):
  out = _grouped_matmul(lhs, rhs, group_sizes, out_dtype, tiling, interpret)
  return out, (lhs, rhs, group_sizes)


def _grouped_matmul_bwd(out_dtype, tiling, interpret, res, grad):
  del out_dtype
  lhs, rhs, group_sizes = res
  # The backward runs in the forward's compute dtype (bf16 grads on GPU);
  # accumulation stays float32.
  grad = grad.astype(jnp.promote_types(lhs.dtype, rhs.dtype))
  dlhs = gmm(grad, rhs, group_sizes, tiling=tiling, interpret=interpret,
             preferred_element_type=lhs.dtype, transpose_rhs=True)
  drhs = tgmm(lhs, grad, group_sizes, tiling=tiling, interpret=interpret,
              preferred_element_type=rhs.dtype)
  return dlhs, drhs, None


_grouped_matmul.defvjp(_grouped_matmul_fwd, _grouped_matmul_bwd)


def grouped_matmul(lhs: Array, rhs: Array, group_sizes: Array, *,
                   preferred_element_type: DType | None = None,
                   tiling: Tiling | None = None,
                   interpret: bool | None = None) -> Array:
  """Differentiable gmm: lhs [M, K], rhs [G, K, N], group_sizes [G] -> [M, N].

  The VJP is dlhs = gmm(grad, rhs^T) and drhs = tgmm(lhs, grad), both Pallas
  kernels; group_sizes gets no gradient.

  Args:
    preferred_element_type: output dtype; None means the promoted input dtype.
    tiling: one Tiling for all three kernels (tests pass small ones); None
      lets each kernel choose its own.
    interpret: see gmm.
  """
  out_dtype = jnp.dtype(preferred_element_type or
                        jnp.promote_types(lhs.dtype, rhs.dtype))
  return _grouped_matmul(lhs, rhs, group_sizes, out_dtype, tiling,
                         _resolve_interpret(interpret))


# ---------------------------------------------------------------------------
# References (pure jnp; loops over groups with masks).


def _group_masks(group_sizes: Array, m: int) -> list[Array]:
  ends = jnp.cumsum(group_sizes.astype(jnp.int32))
  starts = ends - group_sizes.astype(jnp.int32)
  row = jnp.arange(m)
  return [(row >= starts[g]) & (row < ends[g])
          for g in range(group_sizes.shape[0])]


def gmm_reference(lhs: Array, rhs: Array, group_sizes: Array, *,
                  preferred_element_type: DType = jnp.float32,
                  transpose_rhs: bool = False) -> Array:
  """gmm as a loop over groups: every group over all rows, masked."""
  if transpose_rhs:
    rhs = jnp.swapaxes(rhs, 1, 2)
  out = jnp.zeros((lhs.shape[0], rhs.shape[2]), jnp.float32)
  for g, mask in enumerate(_group_masks(group_sizes, lhs.shape[0])):
    y = jnp.dot(lhs, rhs[g], preferred_element_type=jnp.float32,
                precision=jax.lax.Precision.HIGHEST)
    out = out + jnp.where(mask[:, None], y, 0.0)
  return out.astype(preferred_element_type)


def tgmm_reference(lhs: Array, grad: Array, group_sizes: Array, *,
                   preferred_element_type: DType = jnp.float32) -> Array:
  """tgmm as a loop over groups: out[g] = lhs_g^T grad_g with masked rows."""
  outs = []
  for mask in _group_masks(group_sizes, lhs.shape[0]):
    x = jnp.where(mask[:, None], lhs, 0)
    y = jnp.where(mask[:, None], grad, 0)
    outs.append(jnp.einsum('mk,mn->kn', x, y,
                           preferred_element_type=jnp.float32,
                           precision=jax.lax.Precision.HIGHEST))
  return jnp.stack(outs).astype(preferred_element_type)
