"""Jit-safe routing statistics of one MoE layer call (algorithms.md §9).

All are float32 scalars except `expert_counts` and `expert_load` ([E']).
  expert_counts     selections per router slot (the DeepSeek-V3 bias update
                    sums these over a step).
  expert_load       expert_counts / total selections.
  dead_experts      slots with no selection in this call.
  max_mean_load     max_e count / mean_e count (1 = balanced).
  load_cv           coefficient of variation of the counts.
  routing_entropy   mean_t H(p_t), nats: H_total of §9, p the router's full
                    output distribution as LibMoE logs it (`gate_softmax`).
  allocation_entropy mean_b H(h_b / Σ h_b) / ln E', h_b the histogram of the
                    top-1 choices (argmax p_t) over sequence b's tokens (§9).
  weight_entropy    mean_t H(|w_t| / Σ|w_t|) over the active slots, nats.
  router_margin     mean_t (w_(1) - w_(2)) of the sorted |weights| (K >= 2).

w_t are the slot weights (RouterOutput.analysis_weight: MoE++'s copy and
constant slots included). A token the router sent nowhere (a ReMoE token
with every ReLU gate at 0: all its weights and p_t are 0) has no top-1 and
no weight distribution: it is left out of allocation_entropy,
weight_entropy and router_margin rather than counted as expert 0 or as
entropy 0.

Dimension legend: T tokens, E' router width, K slots.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moe_jax.moe.routers.base import RouterOutput


def _entropy(p):
  return -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0),
                  axis=-1)


def top1_choice(p):
  """[T] the top-1 id argmax p_t of each row of p [T, E'], -1 where the row
  is all zero (a token routed nowhere)."""
  return jnp.where(jnp.max(p, axis=-1) > 0, jnp.argmax(p, axis=-1),
                   -1).astype(jnp.int32)


def _masked_mean(values, keep):
  """Mean of values [N] where keep [N] (0 if nowhere)."""
  kept = jnp.sum(keep)
  return jnp.sum(jnp.where(keep, values, 0.0)) / jnp.maximum(kept, 1)


def load_stats(counts):
  """expert_load, dead_experts, max_mean_load and load_cv of selection
  counts [..., E'] (the module doc), over the last axis. The train step
  applies it to the counts summed over its micro-batches as well."""
  counts = counts.astype(jnp.float32)
  total = jnp.maximum(jnp.sum(counts, axis=-1, keepdims=True), 1.0)
  mean = total[..., 0] / counts.shape[-1]
  return {
      'expert_load': counts / total,
      'dead_experts': jnp.sum(counts == 0, axis=-1).astype(jnp.float32),
      'max_mean_load': jnp.max(counts, axis=-1) / mean,
      'load_cv': jnp.std(counts, axis=-1) / mean,
  }


def routing_stats(out: RouterOutput, num_sequences: int = 1) -> dict:
  """Statistics of T = B*S tokens; num_sequences B groups allocation entropy."""
  width = out.probs.shape[-1]
  p = out.analysis_probs.astype(jnp.float32)                   # [T, E']
  # one_hot(-1) is all zeros: tokens routed nowhere add to no histogram.
  top1 = jax.nn.one_hot(top1_choice(p), width, dtype=jnp.float32)
  hist = jnp.sum(top1.reshape(num_sequences, -1, width), axis=1)   # [B, E']
  routed = jnp.sum(hist, -1)                                   # [B]
  alloc = _entropy(hist / jnp.maximum(routed, 1.0)[:, None])
  alloc = alloc / jnp.log(width) if width > 1 else jnp.zeros_like(alloc)
  counts = jnp.sum(jax.nn.one_hot(out.choice, width, dtype=jnp.float32),
                   axis=(0, 1))                                # [E']
  w = jnp.abs(out.analysis_weight.astype(jnp.float32))         # [T, K]
  w_sum = jnp.sum(w, axis=-1, keepdims=True)                   # [T, 1]
  w_norm = w / jnp.maximum(w_sum, 1e-20)
  weighted = w_sum[:, 0] > 0                                   # [T]
  stats = {
      'expert_counts': counts,
      **load_stats(counts),
      'routing_entropy': jnp.mean(_entropy(p)),
      'allocation_entropy': _masked_mean(alloc, routed > 0),
      'weight_entropy': _masked_mean(_entropy(w_norm), weighted),
  }
  if w.shape[-1] >= 2:
    top2 = jax.lax.top_k(w_norm, 2)[0]
    stats['router_margin'] = _masked_mean(top2[:, 0] - top2[:, 1], weighted)
  stats.update({k: jnp.asarray(v, jnp.float32) for k, v in out.stats.items()})
  return stats
