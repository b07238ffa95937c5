"""Cosine-family routers: `xmoe`, `cosine`, `perturbed_cosine` (algorithms.md §3.3-3.5).

XMoE (Chi et al. 2022, arXiv 2204.09179, as in LibMoE):
  r = x W_r [T, E/2]; s_e = <r / max(|r|, 1e-4), ε_e> with |ε_e| = 1.5 kept by a
  projection after every optimiser step (post_update), p = softmax(s / τ),
  S = TopK(p, k), g = renorm(p, S). One softmax: LibMoE's second softmax (D2)
  only behind parity flag `xmoe_double_softmax`.
Cosine-R: ℓ_e = cos(x, w_e) / τ + b_e, S = TopK(ℓ, k), g = softmax(ℓ_S).
Perturbed cosine (Nguyen et al., arXiv 2405.14131): the cosine's norms become
  (|x| + θ)(|w_e| + θ). Parity flag `bias_on_probs` reproduces LibMoE v1.1
  (D10): b added to p = softmax(ℓ) for selection, softmax over the selected p+b.

Dimension legend: T tokens, D model width, E experts, K = top_k, X = xmoe_dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moe_jax.moe.routers import base


# Default temperatures (algorithms.md §3.3, §3.4): XMoE's fixed tau = 0.3
# (LibMoE) and the cosine routers' tau = 0.2 (same logit scale, 1/0.2 = 1.5/0.3).
XMOE_TEMPERATURE = 0.3
COSINE_TEMPERATURE = 0.2


def temperature(cfg: base.RouterConfig, default: float) -> float:
  return cfg.temperature if cfg.temperature is not None else default


# ----------------------------------------------------------------- XMoE ---

def xmoe_dim(cfg: base.RouterConfig) -> int:
  return cfg.xmoe_dim if cfg.xmoe_dim is not None else cfg.num_experts // 2


def project_embeddings(embed, norm: float):
  """Rows of ε [E, X] rescaled to L2 norm `norm` (LibMoE's in-place rescale)."""
  return embed * (norm / jnp.linalg.norm(embed, axis=-1, keepdims=True))


def init_xmoe(key, cfg: base.RouterConfig):
  k_w, k_e = jax.random.split(key)
  dim = xmoe_dim(cfg)
  params = base.router_weight_init(k_w, cfg, dim)
  if cfg.xmoe_embed_init == 'orthogonal':
    embed = jax.nn.initializers.orthogonal(scale=0.32)(
        k_e, (cfg.num_experts, dim), jnp.float32)
  elif cfg.xmoe_embed_init == 'normal':
    embed = 0.02 * jax.random.normal(k_e, (cfg.num_experts, dim), jnp.float32)
  else:
    raise ValueError(
        f"xmoe_embed_init must be 'orthogonal' or 'normal', got "
        f'{cfg.xmoe_embed_init!r}')
  # LibMoE rescales before the first forward, so training starts at norm 1.5.
  params['embed'] = project_embeddings(embed, cfg.xmoe_embed_norm)
  return params, {}


def route_xmoe(params, state, x, cfg: base.RouterConfig, *, step=0, rng=None,
               train=False, prev_logits=None):
  del state, step, rng, train, prev_logits
  r = base.linear_logits(params, x)                            # [T, X]
  r_hat = r / jnp.maximum(jnp.linalg.norm(r, axis=-1, keepdims=True), 1e-4)
  s = jnp.einsum('tx,ex->te', r_hat, params['embed'])          # [T, E]
  p = jax.nn.softmax(s / temperature(cfg, XMOE_TEMPERATURE), axis=-1)
  if cfg.flag('xmoe_double_softmax'):
    p_sel = jax.nn.softmax(p, axis=-1)   # D2: LibMoE's second softmax.
  else:
    p_sel = p
  top, index = jax.lax.top_k(p_sel, cfg.top_k)
  return base.plain_output(index, base.renormalise(top), p, s)


def post_update_xmoe(params, state, stats, cfg: base.RouterConfig):
  """After the optimiser step: project ε back onto the 1.5-sphere (§3.3)."""
  del stats
  params = dict(params)
  params['embed'] = project_embeddings(params['embed'], cfg.xmoe_embed_norm)
  return params, state


# --------------------------------------------------------- cosine, perturbed ---

def init_cosine(key, cfg: base.RouterConfig):
  params = base.router_weight_init(key, cfg, cfg.num_experts)
  params.setdefault('b', jnp.zeros((cfg.num_experts,), jnp.float32))
  return params, {}


def _cosine(x, w, theta: float | None):
  """cos(x, w_e) [T, E]; with theta, the perturbed (|x|+θ)(|w_e|+θ) norms."""
  x = x.astype(jnp.float32)
  dots = jnp.einsum('td,de->te', x, w)
  x_norm = jnp.linalg.norm(x, axis=-1, keepdims=True)          # [T, 1]
  w_norm = jnp.linalg.norm(w, axis=0, keepdims=True)           # [1, E]
  if theta is None:
    # Clamp as torch F.normalize does, so a zero vector scores 0, not NaN.
    return dots / (jnp.maximum(x_norm, 1e-12) * jnp.maximum(w_norm, 1e-12))
  return dots / ((x_norm + theta) * (w_norm + theta))


def _route_cosine_like(params, x, cfg, theta):
  cos = _cosine(x, params['w'], theta)
  tau = temperature(cfg, COSINE_TEMPERATURE)
  bias = params['b']
  if cfg.flag('bias_on_probs'):
    # LibMoE v1.1 (D10): bias on the probabilities, softmax over selected p+b.
    p = jax.nn.softmax(cos / tau, axis=-1)
    top, index = jax.lax.top_k(p + bias, cfg.top_k)
    return base.plain_output(index, jax.nn.softmax(top, -1), p,
                             cos / tau)
  logits = cos / tau + bias                        # [T, E]
  top, index = jax.lax.top_k(logits, cfg.top_k)
  return base.plain_output(index, jax.nn.softmax(top, axis=-1),
                           jax.nn.softmax(logits, axis=-1), logits)


def route_cosine(params, state, x, cfg: base.RouterConfig, *, step=0,
                 rng=None, train=False, prev_logits=None):
  del state, step, rng, train, prev_logits
  return _route_cosine_like(params, x, cfg, theta=None)


def route_perturbed_cosine(params, state, x, cfg: base.RouterConfig, *,
                           step=0, rng=None, train=False, prev_logits=None):
  del state, step, rng, train, prev_logits
  return _route_cosine_like(params, x, cfg, theta=cfg.cosine_theta)


def width(cfg):
  return cfg.num_experts
