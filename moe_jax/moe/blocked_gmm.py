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


# ------------------------------------------------------- fused expert FFN ---

def _act_fn(activation):
  from moe_jax.moe import experts   # late import: experts imports this module
  return lambda h: experts.apply_activation(h, activation)


def _ffn_block(params, xb, e, activation):
  """One iteration's G blocks: (y [G, BM, D], h_pre [G, BM, F'])."""
  h_pre = jnp.einsum('gbd,gdf->gbf', xb, params['w_in'][e].astype(xb.dtype),
                     preferred_element_type=jnp.float32)
  if 'b_in' in params:
    h_pre = h_pre + params['b_in'][e][:, None, :]
  h = _act_fn(activation)(h_pre).astype(xb.dtype)
  y = jnp.einsum('gbf,gfd->gbd', h, params['w_out'][e].astype(xb.dtype),
                 preferred_element_type=jnp.float32)
  if 'b_out' in params:
    y = y + params['b_out'][e][:, None, :]
  return y, h_pre


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _ffn(params, x, expert, used, g, activation):
  return _ffn_fwd(params, x, expert, used, g, activation)[0]


def _ffn_fwd(params, x, expert, used, g, activation):
  nb, bm, d = x.shape
  xs = x.reshape(nb // g, g, bm, d)
  es = expert.reshape(nb // g, g)
  f_in = params['w_in'].shape[-1]

  def body(i, carry):
    out, h_pre = carry
    y, h = _ffn_block(params, xs[i], es[i], activation)
    return out.at[i].set(y.astype(out.dtype)), h_pre.at[i].set(h)

  init = (jnp.zeros((nb // g, g, bm, d), x.dtype),
          jnp.zeros((nb // g, g, bm, f_in), jnp.float32))
  out, h_pre = _loop(_steps(used, g), body, init)
  return out.reshape(nb, bm, d), (params, x, expert, used, h_pre)


def _ffn_bwd(g, activation, res, dy):
  params, x, expert, used, h_pre = res
  nb, bm, d = x.shape
  xs = x.reshape(nb // g, g, bm, d)
  dys = dy.reshape(nb // g, g, bm, d)
  es = expert.reshape(nb // g, g)
  act = _act_fn(activation)
  w_in, w_out = params['w_in'], params['w_out']

  def body(i, grads):
    e, xb, dyb = es[i], xs[i], dys[i]
    h, act_vjp = jax.vjp(act, h_pre[i])
    dh = jnp.einsum('gbd,gfd->gbf', dyb, w_out[e].astype(dyb.dtype),
                    preferred_element_type=jnp.float32)
    dh_pre, = act_vjp(dh)
    dx = jnp.einsum('gbf,gdf->gbd', dh_pre.astype(xb.dtype),
                    w_in[e].astype(xb.dtype), preferred_element_type=jnp.float32)
    new = dict(grads)
    new['x'] = grads['x'].at[i].set(dx.astype(x.dtype))
    new['w_out'] = grads['w_out'].at[e].add(jnp.einsum(
        'gbf,gbd->gfd', h.astype(dyb.dtype), dyb,
        preferred_element_type=jnp.float32))
    new['w_in'] = grads['w_in'].at[e].add(jnp.einsum(
        'gbd,gbf->gdf', xb, dh_pre.astype(xb.dtype),
        preferred_element_type=jnp.float32))
    if 'b_out' in grads:
      new['b_out'] = grads['b_out'].at[e].add(jnp.sum(dyb, axis=1, dtype=jnp.float32))
    if 'b_in' in grads:
      new['b_in'] = grads['b_in'].at[e].add(jnp.sum(dh_pre, axis=1))
    return new

  init = {k: jnp.zeros(v.shape, jnp.float32) for k, v in params.items()}
  init['x'] = jnp.zeros(xs.shape, x.dtype)
  grads = _loop(_steps(used, g), body, init)
  dx = grads.pop('x').reshape(nb, bm, d)
  dparams = {k: grads[k].astype(params[k].dtype) for k in params}
  return dparams, dx, None, None


_ffn.defvjp(_ffn_fwd, _ffn_bwd)


def ffn_blocked(params: dict, x: Array, group_sizes: Array, *, activation: str,
                block_rows: int, blocks_per_step: int) -> Array:
  """Fused expert FFN act(x W_in[e] + b_in[e]) W_out[e] + b_out[e] per block.

  One loop in the forward (both matmuls per block, pre-activations saved) and
  one in the backward (dx, dW_in, dW_out, biases per block).

  Args:
    params: w_in [E, D, F'], w_out [E, F, D], optional b_in [E, F'], b_out [E, D].
    x: [R, D] rows sorted by expert, groups padded to block_rows.
    group_sizes: [E] int32, multiples of block_rows.
  Returns:
    [R, D].
  """
  r, d = x.shape
  step_rows = block_rows * blocks_per_step
  if r % step_rows:
    raise ValueError(f'rows ({r}) must be a multiple of block_rows * '
                     f'blocks_per_step ({step_rows})')
  nb = r // block_rows
  expert, used = block_experts(group_sizes, nb, block_rows)
  y = _ffn(dict(params), x.reshape(nb, block_rows, d), expert, used,
           blocks_per_step, activation)
  return y.reshape(r, d)
