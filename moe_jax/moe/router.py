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
from moe_jax.moe.routers.base import RouterConfig, RouterOutput, RouterSpec, StepHook
from moe_jax.validation import require

__all__ = ['ROUTERS', 'Router', 'RouterConfig', 'RouterOutput', 'RouterSpec',
           'StepHook', 'make_config', 'num_slots', 'output_width']

_STANDARD = ('balance',)

# LibMoE parity flags (algorithms.md §4-5) and the defect each reproduces.
_BIAS_ON_PROBS = {'bias_on_probs': 'D10: bias added to softmax probs; softmax '
                                   'over selected probs'}

ROUTERS: dict[str, RouterSpec] = {
    'smoe': RouterSpec(softmax.init, softmax.route_smoe, softmax.width,
                       _STANDARD),
    'sigmoid': RouterSpec(
        softmax.init, softmax.route_sigmoid, softmax.width, _STANDARD,
        parity_flags={'vlm_loss_on_softmax': 'D9: balance loss on '
                      'softmax(z), as the LibMoE VLM σ-MoE'}),
    'xmoe': RouterSpec(
        cosine.init_xmoe, cosine.route_xmoe, cosine.width, _STANDARD,
        cosine.post_update_xmoe,
        parity_flags={'xmoe_double_softmax': 'D2: second softmax over the '
                      'τ-softmax (flattened weights)'}),
    'cosine': RouterSpec(cosine.init_cosine, cosine.route_cosine, cosine.width,
                         _STANDARD, parity_flags=_BIAS_ON_PROBS),
    'perturbed_cosine': RouterSpec(cosine.init_cosine,
                                   cosine.route_perturbed_cosine, cosine.width,
                                   _STANDARD, parity_flags=_BIAS_ON_PROBS),
    'hyper': RouterSpec(hyper.init, hyper.route, hyper.width, (),
                        check=hyper.check),
    # DeepSeek-V2 routes as SMoE; its shared expert is a layer option.
    'deepseek_v2': RouterSpec(softmax.init, softmax.route_smoe, softmax.width,
                              _STANDARD),
    'deepseek_v3': RouterSpec(
        deepseek.init, deepseek.route, deepseek.width, _STANDARD,
        deepseek.post_update, check=deepseek.check,
        parity_flags={'group_mask_zero': 'D6b: mask dropped groups with 0, '
                      'not -inf (HF export)'}),
    'moe_plus_plus': RouterSpec(
        moe_plus_plus.init, moe_plus_plus.route, moe_plus_plus.width,
        _STANDARD, route_applies_drop_top=True, check=moe_plus_plus.check,
        parity_flags={'moepp_mul_topk': '§5: the reference feeds k x to '
                      'FFN/copy/const experts'}),
    'tc_moe': RouterSpec(
        tc_moe.init, tc_moe.route, tc_moe.width, ('tc_balance', 'tc_reward'),
        check=tc_moe.check,
        parity_flags={'tc_global_counts': 'D7: global batch counts, no '
                      'factor E, in the balance loss'}),
    'remoe': RouterSpec(
        remoe.init, remoe.route, remoe.width, ('remoe_l1',),
        check=remoe.check, slots=remoe.num_slots,
        step_hook=remoe.LAMBDA_HOOK,
        parity_flags={'remoe_libmoe': 'D8: fixed-k top-k on ReLU values, '
                      'scalar E^2 L1 loss'}),
}

_CHOICES = {
    'router_init': ('normal', 'renorm_keep_std', 'torch_default'),
    'noise': ('none', 'noisy_topk'),
    'xmoe_embed_init': ('orthogonal', 'normal'),
    'zero_weight_mode': ('drop', 'keep'),
}


def make_config(router: str, **options: Any) -> RouterConfig:
  """A validated RouterConfig; errors name the offending field.

  The checks every router shares are here; each router's own live in its
  family module (`RouterSpec.check`).
  """
  require(router in ROUTERS, 'router', f'one of {sorted(ROUTERS)}', router)
  spec = ROUTERS[router]
  fields = {f.name for f in dataclasses.fields(RouterConfig)}
  unknown = sorted(set(options) - fields)
  require(not unknown, 'router options', 'fields of RouterConfig', unknown)
  cfg = RouterConfig(**options)
  e, k = cfg.num_experts, cfg.top_k
  require(e >= 1, 'num_experts', 'an integer >= 1', e)
  require(k >= 1, 'top_k', 'an integer >= 1', k)
  for name, allowed in _CHOICES.items():
    require(getattr(cfg, name) in allowed, name, f'one of {allowed}',
            getattr(cfg, name))
  bad_flags = sorted(set(cfg.parity) - set(spec.parity_flags))
  require(not bad_flags, 'parity',
          f'flags of router {router!r} among {sorted(spec.parity_flags)}',
          bad_flags)
  for name in ('init_std', 'expert_dropout', 'bias_update_rate', 'hetero_tau',
               'cosine_theta', 'n_zero', 'n_copy', 'n_const'):
    require(getattr(cfg, name) >= 0, name, 'a value >= 0', getattr(cfg, name))
  require(cfg.expert_dropout < 1, 'expert_dropout', 'a value in [0, 1)',
          cfg.expert_dropout)
  require(cfg.temperature is None or cfg.temperature > 0, 'temperature',
          'None (the router default) or a value > 0', cfg.temperature)
  if spec.check is not None:
    spec.check(cfg)
  # Top-k picks from the router's output space (E' includes special slots).
  width = spec.output_width(cfg)
  require(k <= width, 'top_k', f'at most the router width {width}', k)
  slots = num_slots(router, cfg)
  require(0 <= cfg.drop_top < slots, 'drop_top',
          f'in [0, {slots}) (removing all {slots} slots leaves no expert)',
          cfg.drop_top)
  return cfg


def output_width(router: str, cfg: RouterConfig) -> int:
  """E', the width of the router's output space."""
  return ROUTERS[router].output_width(cfg)


def num_slots(router: str, cfg: RouterConfig) -> int:
  """K, the slots per token of the router's output (ReMoE: its slot budget)."""
  slots = ROUTERS[router].slots
  return cfg.top_k if slots is None else slots(cfg)


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
