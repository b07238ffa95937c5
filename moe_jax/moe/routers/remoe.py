"""ReMoE ReLU routing (Wang et al., arXiv 2412.14711; algorithms.md §3.11).

R = ReLU(z) for every expert: no top-k, no renormalisation. For static shapes
each token keeps its K_slot = remoe_max_active largest R values; a zero value
costs no FFN compute (sentinel), an overflowing token loses its smallest active
experts (reported as `remoe_overflow_frac` and `remoe_dropped_mass`). The L1
loss (`remoe_l1`) is computed on the full R. Parity flag `remoe_libmoe`
reproduces LibMoE b5d10f1 (D8): fixed-k top-k on the ReLU values.

Dimension legend: T tokens, D model width, E experts, K = K_slot slots.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moe_jax.moe.routers import base


def num_slots(cfg: base.RouterConfig) -> int:
  if cfg.flag('remoe_libmoe'):
    return cfg.top_k
  if cfg.remoe_max_active is not None:
    return cfg.remoe_max_active
  return min(2 * cfg.top_k, cfg.num_experts)


def init(key, cfg: base.RouterConfig):
  return base.router_weight_init(key, cfg, cfg.num_experts), {}


def route(params, state, x, cfg: base.RouterConfig, *, step=0, rng=None,
          train=False, prev_logits=None):
  del state, step, rng, train, prev_logits
  z = base.linear_logits(params, x)                            # [T, E]
  relu = jax.nn.relu(z)
  value, index = jax.lax.top_k(relu, num_slots(cfg))           # [T, K]
  if cfg.flag('remoe_libmoe'):
    # LibMoE runs every one of the k experts, even at value 0.
    expert_index, choice = index, index
  else:
    active = value > 0
    expert_index = jnp.where(active, index, cfg.num_experts)
    choice = jnp.where(active, index, -1)
  total = jnp.sum(relu, axis=-1)                               # [T]
  n_active = jnp.sum(relu > 0, axis=-1)
  stats = {
      'remoe_overflow_frac': jnp.mean(n_active > value.shape[-1]),
      'remoe_dropped_mass': jnp.sum(total - jnp.sum(value, -1))
                            / jnp.maximum(jnp.sum(total), 1e-20),
      'remoe_sparsity': 1.0 - jnp.mean(relu > 0),
  }
  probs = relu / jnp.maximum(total[:, None], 1e-20)
  return base.RouterOutput(
      expert_index=expert_index.astype(jnp.int32), weight=value,
      choice=choice.astype(jnp.int32), probs=probs, logits=z,
      balance_eta=base.ones_eta(cfg.num_experts), stats=stats)


def width(cfg):
  return cfg.num_experts
