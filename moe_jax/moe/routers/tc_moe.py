"""TC-MoE ternary expert choice (Yan et al., ICLR 2025; algorithms.md §3.10).

Router width 2E + N: slots [0, E) positive copies, [E, 2E) negative copies,
[2E, 2E+N) null slots. Offsets before the softmax: -1 on negative slots, -10 on
null slots. p = softmax(z), S = TopK(p, k),
  D = Σ_{j: S_j < 2E} p_{S_j} + Σ_{all null n} p_n,  g_j = p_{S_j} / (D + 1e-20),
  sign_j = +1 / -1 / 0 for positive / negative / null, y = Σ_j sign_j g_j f_{S_j mod E}.
Null slots are never dispatched (no FLOPs). Losses: `tc_balance`, `tc_reward`.

Dimension legend: T tokens, D model width, E experts, N null slots, K = top_k.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moe_jax.moe.routers import base
from moe_jax.validation import require


def num_null(cfg: base.RouterConfig) -> int:
  return cfg.num_null if cfg.num_null is not None else cfg.top_k


def width(cfg: base.RouterConfig) -> int:
  return 2 * cfg.num_experts + num_null(cfg)


def init(key, cfg: base.RouterConfig):
  return base.router_weight_init(key, cfg, width(cfg)), {}


def route(params, state, x, cfg: base.RouterConfig, *, step=0, rng=None,
          train=False, prev_logits=None):
  del state, step, rng, train, prev_logits
  e = cfg.num_experts
  slots = jnp.arange(width(cfg))
  offset = jnp.where(slots >= 2 * e, cfg.tc_null_offset,
                     jnp.where(slots >= e, cfg.tc_neg_offset, 0.0))
  z = base.linear_logits(params, x) + offset                   # [T, 2E+N]
  p = jax.nn.softmax(z, axis=-1)
  top, choice = jax.lax.top_k(p, cfg.top_k)                    # [T, K]
  is_null = choice >= 2 * e
  null_mass = jnp.sum(p[:, 2 * e:], axis=-1, keepdims=True)    # [T, 1]
  denom = jnp.sum(jnp.where(is_null, 0.0, top), -1, keepdims=True) + null_mass
  sign = jnp.where(is_null, 0.0, jnp.where(choice < e, 1.0, -1.0))
  weight = sign * top / (denom + base.RENORM_EPS)
  expert_index = jnp.where(is_null, e, choice % e).astype(jnp.int32)
  return base.RouterOutput(
      expert_index=expert_index, weight=weight, choice=choice.astype(jnp.int32),
      probs=p, logits=z, balance_eta=base.ones_eta(width(cfg)))


def check(cfg: base.RouterConfig) -> None:
  require(num_null(cfg) >= 0, 'num_null', 'an integer >= 0', cfg.num_null)
