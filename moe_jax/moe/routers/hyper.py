"""HyperRouter (Do et al., EMNLP 2023; algorithms.md §3.6): router `hyper`.

A frozen hypernetwork H = Linear(D, D/4) -> ReLU -> Linear(D/4, D*E + E)
generates the router [W | b] = reshape(H(e), (E, D + 1)) from a trainable
embedding e [1, D], on every forward (fixes D11). z = x Wᵀ + b. In training
k grows with the step: k_t = round((k_max - k_min) t / t_total) + k_min,
clipped to [k_min, k_max]; evaluation uses k_max. Slots beyond k_t are masked
(weight 0, no FFN compute) so shapes stay static; the weights are a softmax
over the active selected logits. No auxiliary loss.

Dimension legend: T tokens, D model width, E experts, K = k_max, H hidden.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moe_jax.moe.routers import base
from moe_jax.validation import require


def hidden_width(cfg: base.RouterConfig) -> int:
  return cfg.hyper_hidden if cfg.hyper_hidden is not None else cfg.d_model // 4


def init(key, cfg: base.RouterConfig):
  k_e, k_1, k_2 = jax.random.split(key, 3)
  d, e, h = cfg.d_model, cfg.num_experts, hidden_width(cfg)
  params = {'embedding': jax.random.normal(k_e, (1, d), jnp.float32)}
  # H is frozen (LibMoE's trainer callback sets it to no-grad), so it lives in
  # the non-trainable state collection, away from the optimiser.
  state = {
      'hyper_w1': 0.02 * jax.random.normal(k_1, (d, h), jnp.float32),
      'hyper_b1': jnp.zeros((h,), jnp.float32),
      'hyper_w2': 0.02 * jax.random.normal(k_2, (h, d * e + e), jnp.float32),
      'hyper_b2': jnp.zeros((d * e + e,), jnp.float32),
  }
  return params, state


def generate_router(params, state, cfg: base.RouterConfig):
  """[W | b] from the embedding: W [E, D], b [E]."""
  hidden = jax.nn.relu(params['embedding'] @ state['hyper_w1']
                       + state['hyper_b1'])
  flat = hidden @ state['hyper_w2'] + state['hyper_b2']        # [1, D*E + E]
  wb = flat.reshape(cfg.num_experts, cfg.d_model + 1)
  return wb[:, :-1], wb[:, -1]


def active_k(step, cfg: base.RouterConfig, train: bool):
  """k_t of the schedule (a traced int32); k_max in evaluation."""
  k_min, k_max = cfg.hyper_k_min, cfg.top_k
  if not train:
    return jnp.asarray(k_max, jnp.int32)
  frac = jnp.asarray(step, jnp.float32) / max(cfg.total_steps, 1)
  k = jnp.round((k_max - k_min) * frac) + k_min   # round half to even, as torch
  return jnp.clip(k, k_min, k_max).astype(jnp.int32)


def route(params, state, x, cfg: base.RouterConfig, *, step=0, rng=None,
          train=False, prev_logits=None):
  del rng, prev_logits
  w, b = generate_router(params, state, cfg)
  z = jnp.einsum('td,ed->te', x.astype(jnp.float32), w) + b     # [T, E]
  top_z, index = jax.lax.top_k(z, cfg.top_k)                   # [T, K]
  active = jnp.arange(cfg.top_k) < active_k(step, cfg, train)  # [K]
  weight = jax.nn.softmax(jnp.where(active, top_z, -jnp.inf), axis=-1)
  weight = jnp.where(active, weight, 0.0)
  expert_index = jnp.where(active, index, cfg.num_experts).astype(jnp.int32)
  choice = jnp.where(active, index, -1).astype(jnp.int32)
  return base.RouterOutput(
      expert_index=expert_index, weight=weight, choice=choice,
      probs=jax.nn.softmax(z, axis=-1), logits=z,
      balance_eta=base.ones_eta(cfg.num_experts))


def width(cfg):
  return cfg.num_experts


def check(cfg: base.RouterConfig) -> None:
  """The k schedule runs from hyper_k_min up to top_k over total_steps."""
  require(1 <= cfg.hyper_k_min <= cfg.top_k, 'hyper_k_min',
          f'in [1, top_k={cfg.top_k}]', cfg.hyper_k_min)
  require(cfg.total_steps >= 1, 'total_steps', 'an integer >= 1',
          cfg.total_steps)
