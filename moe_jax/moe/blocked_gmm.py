"""Block-sparse grouped matmul for CPU/GPU XLA: the `blocked` expert backend.

The rows arrive sorted by expert with every group padded to a multiple of the
block size BM (dispatch's `row_alignment`), so each BM-row block belongs to one
expert. A `while_loop` walks only the used blocks, G blocks per iteration, and
multiplies each by its expert's weight: [G, BM, D] x [G, D, F]. It never
materialises a dense [T, E, ...] expansion (ragged_dot on CPU does) nor a
per-block copy of all weights (a plain batched einsum over blocks does), and
its backward (dlhs: the same loop with the transposed weight; drhs: per-block
xᵀ dy accumulated into the expert's slot) is written by hand in a custom VJP,
so no loop is differentiated. Accumulation is in float32.

Dimension legend: R rows, D input width, F output width, E experts,
NB = R / BM blocks, G blocks per loop iteration.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

Array = jax.Array


def block_experts(group_sizes: Array, num_blocks: int, block_rows: int):
  """Expert of each block [NB] and the number of blocks in use (scalar)."""
  ends = jnp.cumsum(group_sizes)                                 # [E]
  starts = jnp.arange(num_blocks, dtype=jnp.int32) * block_rows
  expert = jnp.searchsorted(ends, starts, side='right')
  expert = jnp.minimum(expert, group_sizes.shape[0] - 1).astype(jnp.int32)
  return expert, (ends[-1] // block_rows).astype(jnp.int32)


def _loop(num_steps, body, init):
  return jax.lax.fori_loop(0, num_steps, body, init)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _gmm(x, w, expert, used, blocks_per_step):
  return _gmm_forward(x, w, expert, used, blocks_per_step)


def _steps(used, blocks_per_step):
  return (used + blocks_per_step - 1) // blocks_per_step


def _gmm_forward(x, w, expert, used, g, transpose_w=False):
  """out[block] = x[block] @ w[expert[block]] (or @ w[...]ᵀ)."""
  nb, bm, _ = x.shape
  out_width = w.shape[1] if transpose_w else w.shape[2]
  xs = x.reshape(nb // g, g, bm, x.shape[-1])
  es = expert.reshape(nb // g, g)
  eq = 'gbf,gdf->gbd' if transpose_w else 'gbd,gdf->gbf'

  def body(i, out):
    y = jnp.einsum(eq, xs[i], w[es[i]], preferred_element_type=jnp.float32)
    return out.at[i].set(y.astype(out.dtype))

  out = jnp.zeros((nb // g, g, bm, out_width), x.dtype)
  return _loop(_steps(used, g), body, out).reshape(nb, bm, out_width)


def _gmm_fwd(x, w, expert, used, g):
  return _gmm_forward(x, w, expert, used, g), (x, w, expert, used)


def _gmm_bwd(g, res, dy):
  x, w, expert, used = res
  dx = _gmm_forward(dy, w, expert, used, g, transpose_w=True)
  nb, bm, _ = x.shape
  xs = x.reshape(nb // g, g, bm, x.shape[-1])
  dys = dy.reshape(nb // g, g, bm, dy.shape[-1])
  es = expert.reshape(nb // g, g)

  def body(i, dw):
    c = jnp.einsum('gbd,gbf->gdf', xs[i], dys[i],
                   preferred_element_type=jnp.float32)
    return dw.at[es[i]].add(c)

  dw = _loop(_steps(used, g), body, jnp.zeros(w.shape, jnp.float32))
  return dx, dw.astype(w.dtype), None, None


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


def gmm_blocked(x: Array, w: Array, group_sizes: Array, *, block_rows: int,
                blocks_per_step: int) -> Array:
  """Grouped matmul x [R, D] @ w [E, D, F] -> [R, F].

  Args:
    x: [R, D] rows sorted by group; R a multiple of block_rows*blocks_per_step.
    w: [E, D, F] one weight per group.
    group_sizes: [E] int32 rows per group, each a multiple of block_rows.
    block_rows: BM, rows per block.
    blocks_per_step: G, blocks multiplied per loop iteration.
  Returns:
    [R, F]; rows past sum(group_sizes) are 0.
  """
  r, d = x.shape
  step_rows = block_rows * blocks_per_step
  if r % step_rows:
    raise ValueError(f'rows ({r}) must be a multiple of block_rows * '
                     f'blocks_per_step ({step_rows})')
  nb = r // block_rows
  expert, used = block_experts(group_sizes, nb, block_rows)
  y = _gmm(x.reshape(nb, block_rows, d), w, expert, used, blocks_per_step)
  return y.reshape(r, w.shape[-1])
