"""DeepSeek-V3 routing (arXiv 2412.19437; algorithms.md §3.8): router `deepseek_v3`.

  s = σ(z); selection on s̃ = s + b, with b a non-trainable per-expert bias;
  optional group-limited routing: group score = sum of the two largest s̃ in
  each of n_group groups, keep the top `topk_group` groups, mask the others
  with -inf (official DeepSeek-V3 code; parity flag `group_mask_zero` masks
  with 0 as LibMoE / HF do, D6b); S = TopK(s̃, k) over the kept groups;
  g_j = s_{S_j} / Σ_{i∈S} s_i × routed_scaling_factor from each token's OWN
  unbiased scores (D6c fixed). The balance loss sees s' = s / Σ s (D5b fixed).
After each optimiser step (post_update, training only):
  b ← b + γ sign(mean_e c - c), c = counts of the actual biased selections over
  the whole step (all micro-batches and devices; D6 fixed).

DeepSeek-V2 (`deepseek_v2`) routes as `smoe`; its shared expert lives in the layer.

Dimension legend: T tokens, D model width, E experts, G groups, K = top_k.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moe_jax.moe.routers import base
from moe_jax.validation import require


def init(key, cfg: base.RouterConfig):
  params = base.router_weight_init(key, cfg, cfg.num_experts)
  return params, {'bias': jnp.zeros((cfg.num_experts,), jnp.float32)}


def _group_limit(biased, cfg: base.RouterConfig):
  """Masks the experts of all but the top `topk_group` groups: [T, E]."""
  t, e = biased.shape
  grouped = biased.reshape(t, cfg.n_group, e // cfg.n_group)   # [T, G, E/G]
  group_score = jnp.sum(jax.lax.top_k(grouped, 2)[0], axis=-1)  # [T, G]
  _, keep = jax.lax.top_k(group_score, cfg.topk_group)         # [T, topk_group]
  kept = jnp.sum(jax.nn.one_hot(keep, cfg.n_group, dtype=jnp.bool_), axis=1)
  fill = 0.0 if cfg.flag('group_mask_zero') else -jnp.inf
  return jnp.where(kept[:, :, None], grouped, fill).reshape(t, e)


def route(params, state, x, cfg: base.RouterConfig, *, step=0, rng=None,
          train=False, prev_logits=None):
  del step, rng, train, prev_logits
  z = base.linear_logits(params, x)                            # [T, E]
  s = jax.nn.sigmoid(z)
  biased = s + state['bias']
  if cfg.n_group > 1:
    biased = _group_limit(biased, cfg)
  _, index = jax.lax.top_k(biased, cfg.top_k)                  # [T, K]
  top = jnp.take_along_axis(s, index, axis=-1)                 # unbiased
  # DeepSeek-V3 renormalises (norm_topk_prob); Glm4Moe configs may not.
  weight = (base.renormalise(top) if cfg.normalize_topk else top)
  weight = weight * cfg.routed_scaling_factor
  return base.plain_output(index, weight, base.renormalise(s), z,
                           gate_softmax=jax.nn.softmax(z, axis=-1))


def post_update(params, state, stats, cfg: base.RouterConfig):
  """Aux-loss-free bias update from the step's expert counts [E]."""
  counts = stats['expert_counts'][:cfg.num_experts]
  bias = state['bias'] + cfg.bias_update_rate * jnp.sign(
      jnp.mean(counts) - counts)
  return params, {**state, 'bias': bias}


def width(cfg):
  return cfg.num_experts


def check(cfg: base.RouterConfig) -> None:
  """Group-limited routing needs groups that can hold the top-k experts."""
  if cfg.n_group <= 1:
    return
  e, k = cfg.num_experts, cfg.top_k
  require(e % cfg.n_group == 0 and e // cfg.n_group >= 2, 'n_group',
          f'a divisor of num_experts={e} leaving >= 2 experts per group',
          cfg.n_group)
  require(1 <= cfg.topk_group <= cfg.n_group, 'topk_group',
          f'in [1, n_group={cfg.n_group}]', cfg.topk_group)
  require(cfg.topk_group * (e // cfg.n_group) >= k, 'topk_group',
          f'enough kept groups to hold top_k={k} experts', cfg.topk_group)
