"""Jit-safe routing statistics of one MoE layer call (algorithms.md §9).

All are float32 scalars except `expert_counts` and `expert_load` ([E']).
  expert_counts     selections per router slot (the DeepSeek-V3 bias update
                    sums these over a step).
  expert_load       expert_counts / total selections.
  dead_experts      slots with no selection in this call.
  max_mean_load     max_e count / mean_e count (1 = balanced).
  load_cv           coefficient of variation of the counts.
  routing_entropy   mean_t H(probs_t), nats (H_total of §9 where probs is the
                    router's full output distribution).
  weight_entropy    mean_t H(|w_t| / Σ|w_t|) over the active slots, nats.
  router_margin     mean_t (w_(1) - w_(2)) of the sorted |weights| (K >= 2).

Dimension legend: T tokens, E' router width, K slots.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moe_jax.moe.routers.base import RouterOutput


def _entropy(p):
  return -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0),
                  axis=-1)


def routing_stats(out: RouterOutput) -> dict:
  width = out.probs.shape[-1]
  counts = jnp.sum(jax.nn.one_hot(out.choice, width, dtype=jnp.float32),
                   axis=(0, 1))                                # [E']
  total = jnp.maximum(jnp.sum(counts), 1.0)
  mean = total / width
  w = jnp.abs(out.weight.astype(jnp.float32))                  # [T, K]
  w_norm = w / jnp.maximum(jnp.sum(w, axis=-1, keepdims=True), 1e-20)
  stats = {
      'expert_counts': counts,
      'expert_load': counts / total,
      'dead_experts': jnp.sum(counts == 0).astype(jnp.float32),
      'max_mean_load': jnp.max(counts) / mean,
      'load_cv': jnp.std(counts) / mean,
      'routing_entropy': jnp.mean(_entropy(out.probs.astype(jnp.float32))),
      'weight_entropy': jnp.mean(_entropy(w_norm)),
  }
  if w.shape[-1] >= 2:
    top2 = jax.lax.top_k(w_norm, 2)[0]
    stats['router_margin'] = jnp.mean(top2[:, 0] - top2[:, 1])
  stats.update({k: jnp.asarray(v, jnp.float32) for k, v in out.stats.items()})
  return stats
