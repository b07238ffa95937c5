"""Expert-parallel routed FFN: tokens travel to their experts' devices and back.

Inside `jax.shard_map` over the context mesh (`jax.set_mesh`), each device
holds T_l of the tokens and E / n of the experts (n = size of the expert
axis); the router already ran, data-parallel. Per device:

  1. every (token, slot) with an FFN expert gets a destination shard
     e // (E / n) and a position among the slots going there;
  2. a padded all-to-all over the expert axis sends [n, C, D] rows and their
     local expert ids, C = T_l * K: room for every local slot at one
     destination, so nothing is ever dropped (dropless);
  3. the received rows go through the local grouped FFN (any backend);
  4. a second all-to-all returns the outputs, which are weighted and summed
     per token.
Slots of special experts (index >= E: MoE++ zero/copy/constant, TC-MoE null,
ReMoE zero) take no row. Gradients flow through shard_map and all_to_all.

The padded exchange moves n times more rows than a ragged one would; it is
the portable version (ragged_all_to_all is not available on every backend).

Dimension legend: T_l local tokens, K slots, D model width, E experts, n
expert shards, C rows per destination.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from moe_jax.moe import dispatch as dispatch_lib
from moe_jax.moe import experts as experts_lib

# Mesh axes a token batch is split over (config.mesh rules: 'batch').
TOKEN_AXES = ('data', 'fsdp', 'expert')


def active_expert_shards(expert_axis: str | None) -> int:
  """Size of `expert_axis` in the context mesh (1: no expert parallelism)."""
  if expert_axis is None:
    return 1
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or expert_axis not in mesh.axis_names:
    return 1
  return mesh.shape[expert_axis]


def _exchange(x, axis: str):
  """[n, C, ...] -> [n, C, ...]: block j goes to shard j, block i came from i."""
  return jax.lax.all_to_all(x, axis, 0, 0, tiled=True)


def _local_ep_ffn(params, x, weight, expert_index, *, num_experts: int,
                  shards: int, axis: str, activation: str, backend):
  t, k = expert_index.shape
  d = x.shape[-1]
  per_shard = num_experts // shards
  slots = t * k
  flat = expert_index.reshape(-1)                                  # [T_l*K]
  is_ffn = flat < num_experts
  dest = jnp.where(is_ffn, flat // per_shard, shards)              # [T_l*K]
  # Position of each slot among the slots sent to its destination.
  order = jnp.argsort(dest, stable=True)
  counts = jnp.zeros((shards + 1,), jnp.int32).at[dest].add(1)
  start = jnp.cumsum(counts) - counts
  rank = jnp.arange(slots, dtype=jnp.int32) - start[dest[order]]
  position = jnp.zeros((slots,), jnp.int32).at[order].set(rank)  # [T_l*K]
  token = jnp.arange(slots) // k
  send_x = jnp.zeros((shards, slots, d), x.dtype).at[dest, position].set(
      x[token], mode='drop')                                       # [n, C, D]
  send_e = jnp.full((shards, slots), per_shard, jnp.int32).at[
      dest, position].set(flat % per_shard, mode='drop')           # [n, C]
  recv_x = _exchange(send_x, axis).reshape(shards * slots, d)
  recv_e = _exchange(send_e, axis).reshape(shards * slots, 1)
  # About T_l*K real rows arrive (balanced routing), over E / n local experts.
  backend = backend.for_dispatch(slots, per_shard)
  plan = dispatch_lib.plan(recv_e, per_shard, backend.row_alignment,
                           backend.row_multiple)
  ones = jnp.ones((shards * slots, 1), weight.dtype)
  rows = experts_lib.routed_ffn(params, recv_x, ones, plan,
                                activation=activation, backend=backend)
  # The experts' output width D' (d_out) may differ from D.
  back = _exchange(rows.reshape(shards, slots, rows.shape[-1]),
                   axis)                                           # [n, C, D']
  y_slots = back.at[dest, position].get(mode='fill', fill_value=0)
  y_slots = y_slots.reshape(t, k, -1)                              # [T_l, K, D']
  return jnp.einsum('tk,tkd->td', weight.astype(y_slots.dtype), y_slots)


def ep_routed_ffn(params: dict, x, weight, expert_index, *, num_experts: int,
                  expert_axis: str, activation: str, backend):
  """Expert-parallel y[t] = Σ_k weight[t,k] FFN_{index[t,k]}(x[t]).

  Args:
    params: routed expert params with leading axis E (split over
      `expert_axis`; other axes are gathered).
    x: [T, D] tokens, split over the mesh's token axes.
    weight, expert_index: [T, K] (index E or more: no FFN).
    num_experts: E, a multiple of the expert-axis size.
    expert_axis: the mesh axis holding the experts.
    activation, backend: as experts.routed_ffn.

  Returns:
    [T, D'] (D' = the experts' output width, D unless d_out is set).
  """
  mesh = jax.sharding.get_abstract_mesh()
  shards = mesh.shape[expert_axis]
  if num_experts % shards:
    raise ValueError(f'num_experts={num_experts} does not split over mesh '
                     f'axis {expert_axis!r} of size {shards}')
  tokens = P(tuple(a for a in TOKEN_AXES if a in mesh.axis_names))
  param_specs = jax.tree.map(lambda _: P(expert_axis), params)
  fn = lambda p, xx, w, i: _local_ep_ffn(
      p, xx, w, i, num_experts=num_experts, shards=shards, axis=expert_axis,
      activation=activation, backend=backend)
  return jax.shard_map(
      fn, in_specs=(param_specs, tokens, tokens, tokens), out_specs=tokens,
      check_vma=False)(params, x, weight, expert_index)
