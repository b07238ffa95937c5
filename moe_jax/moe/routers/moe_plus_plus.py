"""MoE++ (Jin et al., arXiv 2410.07348; algorithms.md §3.9): router `moe_plus_plus`.

Router output space E' = E FFN experts, then n_const constant experts, then
n_copy copy experts, then n_zero zero experts (the reference order).
  z^l = W^l x + G^l z^{l-1} (gating residual; the first layer gets z^0 = 0),
  p = softmax(z), S = TopK(p, k), g = p_S, then with zero_weight_mode='drop'
  (reference) zero slots get 0 and the other selected slots are renormalised;
  'keep' renormalises over all selected slots (LibMoE VLM).
FFN slots go to dispatch; copy / constant slots are returned in `special` for
the layer (copy: g x; constant c: g (α₁ x + α₂ v_c), [α₁, α₂] = softmax(W_c x));
zero slots cost nothing. The balance loss is heterogeneous: η = 1 for FFN
experts, τ (hetero_tau) for every zero-computation expert, by type (D1b fixed).

Dimension legend: T tokens, D model width, E FFN experts, E' = router width,
K = top_k, N = n_const.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moe_jax.moe.routers import base
from moe_jax.validation import require


def width(cfg: base.RouterConfig) -> int:
  return cfg.num_experts + cfg.n_const + cfg.n_copy + cfg.n_zero


def slot_ranges(cfg: base.RouterConfig) -> dict[str, tuple[int, int]]:
  """[start, stop) of each expert type in the router's output space."""
  e, c, p = cfg.num_experts, cfg.n_const, cfg.n_copy
  return {
      'ffn': (0, e),
      'const': (e, e + c),
      'copy': (e + c, e + c + p),
      'zero': (e + c + p, width(cfg)),
  }


def init(key, cfg: base.RouterConfig):
  w = width(cfg)
  k_1, k_2, k_g = jax.random.split(key, 3)
  if cfg.router_depth == 1:
    params = base.router_weight_init(k_1, cfg, w)
  elif cfg.router_depth == 2:
    hidden = 8 * w   # Linear(d, 8E') -> Tanh -> Linear(8E', E') (reference).
    params = {
        'w': cfg.init_std * jax.random.normal(k_1, (cfg.d_model, hidden)),
        'w_out': cfg.init_std * jax.random.normal(k_2, (hidden, w)),
    }
  else:
    raise ValueError(f'router_depth must be 1 or 2, got {cfg.router_depth}')
  if cfg.gate_residual:
    # G^l ~ N(0, 0.02²): the reference model's _init_weights.
    params['gate_map'] = 0.02 * jax.random.normal(k_g, (w, w), jnp.float32)
  return params, {}


def route(params, state, x, cfg: base.RouterConfig, *, step=0, rng=None,
          train=False, prev_logits=None):
  del state, step, rng, train
  if cfg.router_depth == 1:
    z = base.linear_logits(params, x)                          # [T, E']
  else:
    hidden = jnp.tanh(base.linear_logits(params, x))
    z = hidden @ params['w_out']
  if cfg.gate_residual and prev_logits is not None:
    z = z + prev_logits.astype(jnp.float32) @ params['gate_map']
  p = jax.nn.softmax(z, axis=-1)
  top, choice = jax.lax.top_k(p, cfg.top_k)                    # [T, K]
  ranges = slot_ranges(cfg)
  is_zero = choice >= ranges['zero'][0]
  if cfg.zero_weight_mode == 'drop':
    weight = base.renormalise(jnp.where(is_zero, 0.0, top))
  elif cfg.zero_weight_mode == 'keep':
    weight = base.renormalise(top)
  else:
    raise ValueError(
        f"zero_weight_mode must be 'drop' or 'keep', got {cfg.zero_weight_mode!r}")
  # DropTop before the special slots are split off (removed slots: -1).
  choice, weight = base.drop_top_slots(choice, weight, cfg.drop_top)
  is_ffn = (choice >= 0) & (choice < cfg.num_experts)
  expert_index = jnp.where(is_ffn, choice, cfg.num_experts).astype(jnp.int32)
  is_copy = (choice >= ranges['copy'][0]) & (choice < ranges['copy'][1])
  copy_weight = jnp.sum(jnp.where(is_copy, weight, 0.0), axis=-1)   # [T]
  const_start, const_stop = ranges['const']
  const_onehot = jax.nn.one_hot(choice - const_start,
                                const_stop - const_start)   # [T, K, N]
  const_weight = jnp.einsum('tkn,tk->tn', const_onehot, weight)
  eta = jnp.where(jnp.arange(width(cfg)) < cfg.num_experts, 1.0,
                  cfg.hetero_tau).astype(jnp.float32)
  return base.RouterOutput(
      expert_index=expert_index, weight=jnp.where(is_ffn, weight, 0.0),
      choice=choice.astype(jnp.int32), probs=p, logits=z, balance_eta=eta,
      special={'copy_weight': copy_weight, 'const_weight': const_weight},
      slot_weight=weight)


def check(cfg: base.RouterConfig) -> None:
  require(cfg.router_depth in (1, 2), 'router_depth', '1 or 2',
          cfg.router_depth)
