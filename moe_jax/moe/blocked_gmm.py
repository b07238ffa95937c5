"""Block-sparse grouped matmul for CPU/GPU XLA: the `blocked` expert backend.

The rows are sorted by expert with every group padded to a multiple of the
block size BM (dispatch's `row_alignment`), so each BM-row block belongs to one
expert. `gmm_blocked` is the plain grouped matmul of the backend contract;
`moe_ffn_blocked`, what the layer runs, fuses the dispatch gather, both expert
matmuls and the weighted combine into one loop per pass, so no [R, D] array of
dispatched rows is written (memory traffic, not FLOPs, dominates otherwise).
A `while_loop` walks only the used blocks, G blocks per iteration, and
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

from moe_jax.moe import activations
from moe_jax.moe import dispatch

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


def _in_use(step, blocks_per_step, used):
  """[G] bool: which blocks of loop step `step` lie inside the groups."""
  return step * blocks_per_step + jnp.arange(blocks_per_step) < used


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
    # The last step may hold blocks past the groups: their rows stay 0.
    y = jnp.where(_in_use(i, g, used)[:, None, None], y, 0.0)
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
    return dw.at[es[i]].add(
        jnp.where(_in_use(i, g, used)[:, None, None], c, 0.0))

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


# ------------------------------------------------ expert FFN of one step ---

def _act_fn(activation):
  return lambda h: activations.apply_activation(h, activation)


def _ffn_block(params, xb, e, activation):
  """One iteration's G blocks: (y [G, BM, D'], h_pre [G, BM, F'])."""
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


# ------------------------- fused dispatch gather + expert FFN + combine ---

@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def _moe_ffn(params, x, weight, token_of_row, slot_of_row, row_of_slot,
             expert_used, g, activation):
  return _moe_ffn_fwd(params, x, weight, token_of_row, slot_of_row,
                      row_of_slot, expert_used, g, activation)[0]


def _moe_ffn_fwd(params, x, weight, token_of_row, slot_of_row, row_of_slot,
                 expert_used, g, activation):
  expert, used = expert_used
  nb = expert.shape[0]
  bm = token_of_row.shape[0] // nb
  toks = token_of_row.reshape(nb // g, g, bm)
  es = expert.reshape(nb // g, g)
  # Output rows are D' = w_out's width wide (D unless the block sets d_out).
  d_out, f_in = params['w_out'].shape[-1], params['w_in'].shape[-1]

  def body(i, carry):
    out, h_pre = carry
    # Each block's token rows are gathered into cache and consumed at once:
    # no [R, D] dispatched copy of x is ever written to memory.
    y, h = _ffn_block(params, dispatch.take_rows(x, toks[i]), es[i], activation)
    return out.at[i].set(y.astype(out.dtype)), h_pre.at[i].set(h)

  init = (jnp.zeros((nb // g, g, bm, d_out), x.dtype),
          jnp.zeros((nb // g, g, bm, f_in), jnp.float32))
  rows, h_pre = _loop(_steps(used, g), body, init)
  y = dispatch.sum_slot_rows(rows.reshape(nb * bm, d_out), row_of_slot,
                             weight)                             # [T, D']
  res = (params, x, weight, token_of_row, slot_of_row, row_of_slot,
         expert_used, h_pre)
  return y, res


def _moe_ffn_bwd(g, activation, res, dy):
  (params, x, weight, token_of_row, slot_of_row, row_of_slot, expert_used,
   h_pre) = res
  expert, used = expert_used
  nb = expert.shape[0]
  bm = token_of_row.shape[0] // nb
  d = x.shape[-1]
  toks = token_of_row.reshape(nb // g, g, bm)
  w_of_row = dispatch.take_rows(weight.reshape(-1), slot_of_row)
  w_of_row = w_of_row.reshape(nb // g, g, bm)
  es = expert.reshape(nb // g, g)
  act = _act_fn(activation)
  w_in, w_out = params['w_in'], params['w_out']

  def body(i, grads):
    e, xb = es[i], dispatch.take_rows(x, toks[i])
    dy_tok = dispatch.take_rows(dy, toks[i])       # [G, BM, D], unweighted
    w_row = w_of_row[i][..., None].astype(jnp.float32)
    h, act_vjp = jax.vjp(act, h_pre[i])
    # dL/d(expert output) = w dy; the projection dy W_outᵀ serves both dh and
    # the routing-weight gradient <dy, h W_out + b_out>
    #   = <dy W_outᵀ, h> + <dy, b_out>.
    dh_unit = jnp.einsum('gbd,gfd->gbf', dy_tok, w_out[e].astype(dy_tok.dtype),
                         preferred_element_type=jnp.float32)
    dw_row = jnp.sum(dh_unit * h, axis=-1)                       # [G, BM]
    if 'b_out' in params:
      dw_row = dw_row + jnp.einsum('gbd,gd->gb', dy_tok, params['b_out'][e],
                                   preferred_element_type=jnp.float32)
    dyb = (dy_tok * w_row).astype(x.dtype)
    dh_pre, = act_vjp(dh_unit * w_row)
    d_rows = jnp.einsum('gbf,gdf->gbd', dh_pre.astype(xb.dtype),
                        w_in[e].astype(xb.dtype),
                        preferred_element_type=jnp.float32)
    new = dict(grads)
    new['rows'] = grads['rows'].at[i].set(d_rows.astype(x.dtype))
    new['w_row'] = grads['w_row'].at[i].set(dw_row)
    new['w_out'] = grads['w_out'].at[e].add(jnp.einsum(
        'gbf,gbd->gfd', h.astype(dyb.dtype), dyb,
        preferred_element_type=jnp.float32))
    new['w_in'] = grads['w_in'].at[e].add(jnp.einsum(
        'gbd,gbf->gdf', xb, dh_pre.astype(xb.dtype),
        preferred_element_type=jnp.float32))
    if 'b_out' in grads:
      new['b_out'] = grads['b_out'].at[e].add(
          jnp.sum(dyb, axis=1, dtype=jnp.float32))
    if 'b_in' in grads:
      new['b_in'] = grads['b_in'].at[e].add(jnp.sum(dh_pre, axis=1))
    return new

  init = {k: jnp.zeros(v.shape, jnp.float32) for k, v in params.items()}
  init['rows'] = jnp.zeros((nb // g, g, bm, d), x.dtype)
  init['w_row'] = jnp.zeros((nb // g, g, bm), jnp.float32)
  grads = _loop(_steps(used, g), body, init)
  d_rows = grads.pop('rows').reshape(nb * bm, d)
  dw_row = grads.pop('w_row').reshape(nb * bm)
  # Dispatch's backward: each token sums its K rows' gradients (gathers).
  dx = dispatch.sum_slot_rows(d_rows, row_of_slot)
  d_weight = dispatch.take_rows(dw_row, row_of_slot)             # [T, K]
  d_weight = d_weight.astype(weight.dtype)
  dparams = {k: grads[k].astype(params[k].dtype) for k in params}
  return dparams, dx, d_weight, None, None, None, None


_moe_ffn.defvjp(_moe_ffn_fwd, _moe_ffn_bwd)


def moe_ffn_blocked(params: dict, x: Array, weight: Array, token_of_row: Array,
                    slot_of_row: Array, row_of_slot: Array,
                    group_sizes: Array, *, activation: str, block_rows: int,
                    blocks_per_step: int) -> Array:
  """Dispatch gather, blocked expert FFN and weighted combine in one op.

  Equals combine(ffn_blocked(params, x[token_of_row], group_sizes), weight)
  of dispatch.py, differentiable in params, x and weight, but the token rows
  are gathered block by block inside the loop and the combine's backward runs
  inside the FFN's backward loop, so neither writes an [R, D] array.

  Args:
    params: as ffn_blocked.
    x: [T, D] token activations.
    weight: [T, K] combine weight of each slot.
    token_of_row: [R] int32 (T for padding rows); slot_of_row: [R] int32
      (T*K for padding); row_of_slot: [T, K] int32 (R for slots without row),
      as in dispatch.DispatchState.
    group_sizes: [E] int32 multiples of block_rows.
  Returns:
    [T, D].
  """
  r = token_of_row.shape[0]
  step_rows = block_rows * blocks_per_step
  if r % step_rows:
    raise ValueError(f'rows ({r}) must be a multiple of block_rows * '
                     f'blocks_per_step ({step_rows})')
  expert_used = block_experts(group_sizes, r // block_rows, block_rows)
  return _moe_ffn(dict(params), x, weight, token_of_row, slot_of_row,
                  row_of_slot, expert_used, blocks_per_step, activation)
