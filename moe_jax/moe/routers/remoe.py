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
from moe_jax.validation import require


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


def check(cfg: base.RouterConfig) -> None:
  e = cfg.num_experts
  require(num_slots(cfg) <= e, 'remoe_max_active', f'at most num_experts={e}',
          num_slots(cfg))
  require(cfg.top_k <= e, 'top_k', f'at most num_experts={e}', cfg.top_k)


# ----------------------------------------------------------------------------
# Adaptive L1 weight λ (algorithms.md §3.11), kept by the train step.

# LibMoE LM ReMoE (parity flag remoe_libmoe, D8): per-layer λ clamped here.
LIBMOE_LAMBDA_CLAMP = (1e-6, 1e2)


def check_lambda_options(options) -> None:
  """options: {'lambda0': initial λ > 0, 'alpha': multiplier > 1}."""
  for name in ('lambda0', 'alpha'):
    require(name in options, name, 'a value (adaptive-lambda setting)', None)
  require(options['lambda0'] > 0, 'lambda0', 'a value > 0',
          options['lambda0'])
  require(options['alpha'] > 1, 'alpha', 'a value > 1', options['alpha'])


def init_lambda(cfg: base.RouterConfig, num_layers: int, options) -> dict:
  """{'lambda': [L]} all lambda0 (one value per layer, equal unless D8)."""
  del cfg
  return {'lambda': jnp.full((num_layers,), options['lambda0'], jnp.float32)}


def lambda_loss_scales(state) -> dict:
  """The L1 loss of layer l is weighted by λ_l."""
  return {'remoe_l1': state['lambda']}


def update_lambda(state, layer_stats, cfg: base.RouterConfig,
                  options) -> dict:
  """One λ update from the step's sparsity [L] (algorithms.md §3.11).

  Paper: S = mean over layers; λ ← λ·α if S < target else λ/α with target
  1 - k/E, no clamp, one value for all layers. LibMoE parity (D8): per layer,
  clamped to LIBMOE_LAMBDA_CLAMP.
  """
  lam, alpha = state['lambda'], options['alpha']
  sparsity = layer_stats['remoe_sparsity']                      # [L]
  target = 1.0 - cfg.top_k / cfg.num_experts
  if cfg.flag('remoe_libmoe'):
    up = sparsity < target                                      # [L]
    new = jnp.where(up, lam * alpha, lam / alpha)
    return {'lambda': jnp.clip(new, *LIBMOE_LAMBDA_CLAMP)}
  up = jnp.mean(sparsity) < target
  return {'lambda': jnp.where(up, lam * alpha, lam / alpha)}


def lambda_metrics(state) -> dict:
  return {'remoe_lambda': jnp.mean(state['lambda'])}


LAMBDA_HOOK = base.StepHook(
    options_key='remoe', check=check_lambda_options, init=init_lambda,
    loss_scales=lambda_loss_scales, update=update_lambda,
    metrics=lambda_metrics)
