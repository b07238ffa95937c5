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

Dimension legend: T tokens, E' router width, K slots.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moe_jax.moe.routers.base import RouterOutput


def _entropy(p):
  return -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0),
                  axis=-1)


def routing_stats(out: RouterOutput, num_sequences: int = 1) -> dict:
  """Statistics of T = B*S tokens; num_sequences B groups allocation entropy."""
  width = out.probs.shape[-1]
  p = out.analysis_probs.astype(jnp.float32)                   # [T, E']
  top1 = jax.nn.one_hot(jnp.argmax(p, axis=-1), width, dtype=jnp.float32)
  hist = jnp.sum(top1.reshape(num_sequences, -1, width), axis=1)   # [B, E']
  alloc = _entropy(hist / jnp.sum(hist, -1, keepdims=True))
  alloc = alloc / jnp.log(width) if width > 1 else jnp.zeros_like(alloc)
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
      'routing_entropy': jnp.mean(_entropy(p)),
      'allocation_entropy': jnp.mean(alloc),
      'weight_entropy': jnp.mean(_entropy(w_norm)),
  }
  if w.shape[-1] >= 2:
    top2 = jax.lax.top_k(w_norm, 2)[0]
    stats['router_margin'] = jnp.mean(top2[:, 0] - top2[:, 1])
  stats.update({k: jnp.asarray(v, jnp.float32) for k, v in out.stats.items()})
  return stats
