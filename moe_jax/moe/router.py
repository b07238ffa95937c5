"""The router registry (`ROUTERS`: name -> RouterSpec) and the module owning router params.

Every routing algorithm of algorithms.md §3 is a pure function of
(params, state, x, step, rng) returning a `RouterOutput`; `Router` is the thin
Flax module that owns the trainable parameters (collection 'params') and the
non-trainable router state (collection 'router_state': DeepSeek-V3 bias,
HyperRouter's frozen hypernetwork), which only the train step updates.

Dimension legend: T tokens, D model width, E experts, E' router width, K slots.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax

from moe_jax.moe.routers import base
from moe_jax.moe.routers import cosine
from moe_jax.moe.routers import deepseek
from moe_jax.moe.routers import hyper
from moe_jax.moe.routers import moe_plus_plus
from moe_jax.moe.routers import remoe
from moe_jax.moe.routers import softmax
from moe_jax.moe.routers import tc_moe
from moe_jax.moe.routers.base import PARITY_FLAGS, RouterConfig, RouterOutput, RouterSpec

__all__ = ['ROUTERS', 'Router', 'RouterConfig', 'RouterOutput', 'RouterSpec',
           'make_config', 'num_slots', 'output_width']

_STANDARD = ('balance',)

ROUTERS: dict[str, RouterSpec] = {
    'smoe': RouterSpec(softmax.init, softmax.route_smoe, softmax.width,
                       _STANDARD),
    'sigmoid': RouterSpec(softmax.init, softmax.route_sigmoid, softmax.width,
                          _STANDARD),
    'xmoe': RouterSpec(cosine.init_xmoe, cosine.route_xmoe, cosine.width,
                       _STANDARD, cosine.post_update_xmoe),
    'cosine': RouterSpec(cosine.init_cosine, cosine.route_cosine, cosine.width,
                         _STANDARD),
    'perturbed_cosine': RouterSpec(cosine.init_cosine,
                                   cosine.route_perturbed_cosine, cosine.width,
                                   _STANDARD),
    'hyper': RouterSpec(hyper.init, hyper.route, hyper.width, ()),
    # DeepSeek-V2 routes as SMoE; its shared expert is a layer option.
    'deepseek_v2': RouterSpec(softmax.init, softmax.route_smoe, softmax.width,
                              _STANDARD),
    'deepseek_v3': RouterSpec(deepseek.init, deepseek.route, deepseek.width,
                              _STANDARD, deepseek.post_update),
    'moe_plus_plus': RouterSpec(moe_plus_plus.init, moe_plus_plus.route,
                                moe_plus_plus.width, _STANDARD,
                                route_applies_drop_top=True),
    'tc_moe': RouterSpec(tc_moe.init, tc_moe.route, tc_moe.width,
                         ('tc_balance', 'tc_reward')),
    'remoe': RouterSpec(remoe.init, remoe.route, remoe.width, ('remoe_l1',)),
}

_CHOICES = {
    'router_init': ('normal', 'renorm_keep_std', 'torch_default'),
    'noise': ('none', 'noisy_topk'),
    'xmoe_embed_init': ('orthogonal', 'normal'),
    'zero_weight_mode': ('drop', 'keep'),
}


def _check(ok: bool, field: str, expected: str, got: Any) -> None:
  if not ok:
    raise ValueError(f'{field}: expected {expected}, got {got!r}')


def make_config(router: str, **options: Any) -> RouterConfig:
  """A validated RouterConfig; errors name the offending field."""
  _check(router in ROUTERS, 'router', f'one of {sorted(ROUTERS)}', router)
  fields = {f.name for f in dataclasses.fields(RouterConfig)}
  unknown = sorted(set(options) - fields)
  _check(not unknown, 'router options', 'fields of RouterConfig', unknown)
  cfg = RouterConfig(**options)
  e, k = cfg.num_experts, cfg.top_k
  _check(e >= 1, 'num_experts', 'an integer >= 1', e)
  _check(k >= 1, 'top_k', 'an integer >= 1', k)
  for name, allowed in _CHOICES.items():
    _check(getattr(cfg, name) in allowed, name, f'one of {allowed}',
           getattr(cfg, name))
  bad_flags = sorted(set(cfg.parity) - PARITY_FLAGS)
  _check(not bad_flags, 'parity', f'flags among {sorted(PARITY_FLAGS)}',
         bad_flags)
  for name in ('init_std', 'expert_dropout', 'bias_update_rate', 'hetero_tau',
               'cosine_theta', 'n_zero', 'n_copy', 'n_const'):
    _check(getattr(cfg, name) >= 0, name, 'a value >= 0', getattr(cfg, name))
  _check(cfg.expert_dropout < 1, 'expert_dropout', 'a value in [0, 1)',
         cfg.expert_dropout)
  _check(cfg.temperature is None or cfg.temperature > 0, 'temperature',
         'None (the router default) or a value > 0', cfg.temperature)
  width = ROUTERS[router].output_width(cfg)
  if router == 'remoe':
    _check(num_slots(router, cfg) <= e, 'remoe_max_active',
           f'at most num_experts={e}', num_slots(router, cfg))
    _check(k <= e, 'top_k', f'at most num_experts={e}', k)
  else:
    # Top-k picks from the router's output space (E' includes special slots).
    _check(k <= width, 'top_k', f'at most the router width {width}', k)
  slots = num_slots(router, cfg)
  _check(0 <= cfg.drop_top < slots, 'drop_top',
         f'in [0, {slots}) (removing all {slots} slots leaves no expert)',
         cfg.drop_top)
  if router == 'hyper':
    _check(1 <= cfg.hyper_k_min <= k, 'hyper_k_min', f'in [1, top_k={k}]',
           cfg.hyper_k_min)
    _check(cfg.total_steps >= 1, 'total_steps', 'an integer >= 1',
           cfg.total_steps)
  if router == 'deepseek_v3' and cfg.n_group > 1:
    _check(e % cfg.n_group == 0 and e // cfg.n_group >= 2, 'n_group',
           f'a divisor of num_experts={e} leaving >= 2 experts per group',
           cfg.n_group)
    _check(1 <= cfg.topk_group <= cfg.n_group, 'topk_group',
           f'in [1, n_group={cfg.n_group}]', cfg.topk_group)
    _check(cfg.topk_group * (e // cfg.n_group) >= k, 'topk_group',
           f'enough kept groups to hold top_k={k} experts', cfg.topk_group)
  if router == 'moe_plus_plus':
    _check(cfg.router_depth in (1, 2), 'router_depth', '1 or 2',
           cfg.router_depth)
  if router == 'tc_moe':
    _check(tc_moe.num_null(cfg) >= 0, 'num_null', 'an integer >= 0',
           cfg.num_null)
  return cfg


def output_width(router: str, cfg: RouterConfig) -> int:
  """E', the width of the router's output space."""
  return ROUTERS[router].output_width(cfg)


def num_slots(router: str, cfg: RouterConfig) -> int:
  """K, the slots per token of the router's output (ReMoE: its slot budget)."""
  return remoe.num_slots(cfg) if router == 'remoe' else cfg.top_k


class Router(nn.Module):
  """Owns one router's parameters and state; routes x [T, D] -> RouterOutput."""

  name_: str
  config: RouterConfig

  def setup(self):
    spec = ROUTERS[self.name_]
    # One init draws params and state together; the state is stored in its own
    # collection so the optimiser never sees it.
    init_fn = lambda key: spec.init(key, self.config)
    self.router_params = self.param('router', lambda k: init_fn(k)[0])
    # Stateless routers get no 'router_state' entry, so callers may apply
    # them with params alone.
    has_state = bool(jax.eval_shape(init_fn, jax.random.key(0))[1])
    self.state = self.variable(
        'router_state', 'router',
        lambda: init_fn(self.make_rng('params'))[1]) if has_state else None

  def __call__(self, x, *, step=0, train=False, prev_logits=None,
               rng=None) -> RouterOutput:
    state = self.state.value if self.state is not None else {}
    spec = ROUTERS[self.name_]
    out = spec.route(self.router_params, state, x, self.config, step=step,
                     rng=rng, train=train, prev_logits=prev_logits)
    if self.config.drop_top and not spec.route_applies_drop_top:
      out = base.drop_top(out, self.config.drop_top, self.config.num_experts)
    return out
