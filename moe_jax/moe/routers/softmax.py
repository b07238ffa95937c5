"""Softmax and sigmoid top-k routers: `smoe`, `sigmoid` (algorithms.md §3.1-3.2).

SMoE (Shazeer et al. 2017; LibMoE LM `selection_mode: gate`):
  p = softmax(z), S = TopK(p, k), g = renorm(p, S) = softmax(z_S).
σ-MoE (Csordás et al. 2023; LibMoE `selection_mode: sigmoid`):
  p = σ(z), S = TopK(p, k), g = renorm(p, S) (or σ(z_S) un-normalised).
  The balance loss sees the normalised sigmoid p̂ = σ(z)/Σσ(z) (fixes D9/D5b;
  parity flag `vlm_loss_on_softmax` feeds softmax(z) instead).

Dimension legend: T tokens, D model width, E experts, K = top_k.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moe_jax.moe.routers import base


def init(key, cfg: base.RouterConfig):
  k_w, k_noise = jax.random.split(key)
  params = base.router_weight_init(k_w, cfg, cfg.num_experts)
  if cfg.noise == 'noisy_topk':
    # Shazeer et al. initialise the noise projection to zero.
    params['w_noise'] = jnp.zeros((cfg.d_model, cfg.num_experts), jnp.float32)
  return params, {}


def _logits(params, x, cfg, rng, train):
  rng_noise, rng_drop = base.split_rng(rng, 2)
  z = base.linear_logits(params, x)                            # [T, E]
  z_sel = base.add_training_noise(z, params, x, cfg, rng_noise, train)
  return z, z_sel, rng_drop


def route_smoe(params, state, x, cfg: base.RouterConfig, *, step=0, rng=None,
               train=False, prev_logits=None):
  """Softmax top-k; weights are a softmax over the selected logits."""
  del state, step, prev_logits
  z, z_sel, rng_drop = _logits(params, x, cfg, rng, train)
  z_sel = base.drop_experts(z_sel, cfg, rng_drop, train)
  # softmax is monotone, so TopK(softmax(z)) = TopK(z).
  top_z, index = jax.lax.top_k(z_sel, cfg.top_k)               # [T, K]
  if cfg.normalize_topk:
    # renorm(softmax(z), S) == softmax(z_S), computed stably (§3.1).
    weight = jax.nn.softmax(top_z, axis=-1)
  else:
    weight = jnp.take_along_axis(jax.nn.softmax(z_sel, -1), index, axis=-1)
  return base.plain_output(index, weight, jax.nn.softmax(z, axis=-1), z)


def route_sigmoid(params, state, x, cfg: base.RouterConfig, *, step=0,
                  rng=None, train=False, prev_logits=None):
  """Sigmoid top-k; renormalised weights unless normalize_topk=False."""
  del state, step, prev_logits
  z, z_sel, rng_drop = _logits(params, x, cfg, rng, train)
  scores = jax.nn.sigmoid(z_sel)                               # [T, E]
  _, index = jax.lax.top_k(base.drop_experts(scores, cfg, rng_drop, train),
                           cfg.top_k)
  top = jnp.take_along_axis(scores, index, axis=-1)            # [T, K]
  weight = base.renormalise(top) if cfg.normalize_topk else top
  if cfg.flag('vlm_loss_on_softmax'):
    probs = jax.nn.softmax(z, axis=-1)
  else:
    probs = base.renormalise(jax.nn.sigmoid(z))
  return base.plain_output(index, weight, probs, z,
                           gate_softmax=jax.nn.softmax(z, axis=-1))


def width(cfg):
  return cfg.num_experts
