"""Sparse upcycling of a LLaVA model's vision-tower MLPs and projector
(algorithms.md §10.1; LibMoE llava_arch.py::initialize_vision_modules).

    params, router_state = upcycle_llava(moe_model, dense_params)

`moe_model` is the target models.llava.Llava (tower_ffn / projector_ffn
'moe', its `moe` kwargs naming the router, E, k, shared experts, ...);
`dense_params` a Llava parameter tree whose sites are dense
(`layer_{i}/ffn/ffn/*`, `projector/ffn/ffn/*`). For every site in `sites`:

  experts   E exact copies of the dense MLP, biases included (any
            activation: the tower's GELU-tanh / quick-GELU, the projector's
            GELU; upcycle.tile_experts), optionally with relative Gaussian
            noise `noise`;
  shared    (shared_experts n > 0, DeepSeek layouts) n copies merged into
            one MLP computing the dense function (upcycle.shared_weights);
            with shared_mix 'half' the block is 0.5 shared + 0.5 routed;
  router    the router's own init with std 0.02 (LibMoE std_gate), from
            jax.random.key(42) at every site with router_seed='libmoe'
            (LibMoE's torch.Generator seeded 42 per layer: every router of
            one shape starts identical; jax's generator, so not torch's
            values), else fold_in(key(seed), site index);
  other     parameters the dense model lacks (MoE++ constant experts) and
            router state (DeepSeek-V3's bias) from the block's own init.

Everything else (the LLM, attention, norms, embeddings) is copied. With no
noise, routers whose weights sum to 1 over the FFN experts (smoe, sigmoid
renormalised, xmoe, cosine, deepseek_v2/v3 with 'half') reproduce the dense
model at step 0; MoE++ and TC-MoE do not.

Dimension legend: D_v tower width, F_v tower MLP width, W projector width,
E experts.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from moe_jax.convert import hf_import
from moe_jax.convert import upcycle
from moe_jax.moe import layer as layer_lib
from moe_jax.moe import router as router_lib
from moe_jax.validation import require

SITES = ('tower', 'projector')


def _targets(model, sites: Sequence[str], *, seed: int, router_seed: str
             ) -> list[tuple[tuple[str, ...], dict[str, Any], tuple]]:
  """(site path, MoEBlock kwargs, router (params, state)) per MoE site.

  Router index (the per_layer seed's fold_in): tower layer i has i, the
  projector L, the number of tower layers; upcycle.router_variables draws
  each site's router shape once for indices 0..L-1 (tower) or 0..L.
  """
  out = []
  num_layers = model.tower['num_layers']
  draw = lambda kwargs, n: upcycle.router_variables(
      kwargs['router'], _router_cfg(kwargs), n, seed=seed,
      router_seed=router_seed)
  if 'tower' in sites:
    kwargs = model.tower_moe_kwargs()
    routers = draw(kwargs, num_layers)
    out += [(('vision', f'layer_{i}'), kwargs, routers[i])
            for i in range(num_layers)]
  if 'projector' in sites:
    kwargs = model.projector_moe_kwargs()
    out.append((('projector',), kwargs, draw(kwargs, num_layers + 1)[-1]))
  return out


def _fresh_params(kwargs: Mapping[str, Any], seed: int) -> dict:
  """The params of MoEBlock(**kwargs)'s own init (numpy)."""
  block = layer_lib.MoEBlock(**kwargs)
  x = jnp.zeros((1, 2, kwargs['d_model']), jnp.float32)
  variables = nn.unbox(jax.jit(lambda k: block.init(
      {'params': k, 'router': k}, x))(jax.random.key(seed)))
  return jax.tree.map(np.asarray, dict(variables['params']))


def _router_cfg(kwargs: Mapping[str, Any]) -> router_lib.RouterConfig:
  options = {'init_std': upcycle.ROUTER_STD,
             **dict(kwargs.get('router_options') or {})}
  return router_lib.make_config(kwargs['router'],
                                num_experts=kwargs['num_experts'],
                                top_k=kwargs['top_k'],
                                d_model=kwargs['d_model'], **options)


def upcycle_llava(model, dense_params: Mapping, *,
                  sites: Sequence[str] = SITES, noise: float = 0.0,
                  seed: int = 0, router_seed: str = 'libmoe',
                  router_state: Mapping | None = None
                  ) -> tuple[dict, dict]:
  """(params, router_state) of `model` with `sites` upcycled from dense.

  Args:
    model: the target models.llava.Llava; each site in `sites` must be
      'moe' in it (tower_ffn / projector_ffn).
    dense_params: a Llava parameter tree whose `sites` are dense MLPs.
    sites: which of ('tower', 'projector') to upcycle.
    noise: relative std of Gaussian noise added to every expert tensor.
    seed: seed of the noise, of the parameters the dense model lacks and
      (router_seed='per_layer') of the routers.
    router_seed: 'libmoe' (key 42 at every site) | 'per_layer'.
    router_state: the dense model's router state, kept for the other sites
      (None: empty).

  Returns:
    (params, router_state) as jnp float32 trees; apply with
    {'params': params, 'router_state': router_state} (omit it when empty).
  """
  sites = tuple(sites)
  bad = [s for s in sites if s not in SITES]
  require(not bad, 'sites', f'names among {SITES}', sites)
  for site, field in (('tower', 'tower_ffn'), ('projector', 'projector_ffn')):
    require(site not in sites or getattr(model, field) == 'moe', field,
            f"'moe' in the target model to upcycle the {site}",
            getattr(model, field))
  # New containers (leaves shared, never written): the input is untouched.
  params = jax.tree.map(np.asarray, flax.core.unfreeze(dense_params))
  state = jax.tree.map(np.asarray, flax.core.unfreeze(router_state or {}))
  rng = np.random.default_rng(seed)
  fresh_of: dict[int, dict] = {}
  for path, kwargs, (router_params, router_vars) in _targets(
      model, sites, seed=seed, router_seed=router_seed):
    site = hf_import.get_path(params, path)
    where = '/'.join(path)
    require('ffn' in site, f'{where}/ffn', 'a dense MLP to upcycle',
            sorted(site))
    dense = {k: np.asarray(v, np.float32)
             for k, v in dict(site['ffn']['ffn']).items()}
    require(dense['w_out'].shape[0] == kwargs['expert_width'],
            f'{where}/ffn/ffn/w_out',
            f"[{kwargs['expert_width']}, ...] (the experts' width)",
            dense['w_out'].shape)
    # The block's own init gives what the dense MLP lacks (MoE++ constant
    # experts); the rest is overwritten.
    if id(kwargs) not in fresh_of:               # one init per site shape
      fresh_of[id(kwargs)] = _fresh_params(kwargs, seed)
    fresh = jax.tree.map(lambda a: a, fresh_of[id(kwargs)])
    fresh['experts'].update(upcycle.tile_experts(
        dense, num_experts=kwargs['num_experts'],
        activation=kwargs['activation'], noise=noise, rng=rng))
    shared = kwargs.get('shared_experts', 0)
    if shared:
      width = kwargs.get('shared_width') or kwargs['expert_width']
      require(width == kwargs['expert_width'], 'shared_width',
              f"None or the dense MLP width {kwargs['expert_width']} (each "
              'shared expert is a copy of it)', width)
      fresh['shared'].update(upcycle.shared_weights(dense, shared,
                                                    kwargs['activation']))
    fresh['router']['router'] = jax.tree.map(np.asarray, router_params)
    del site['ffn']
    site['moe'] = fresh
    if router_vars:
      hf_import.set_path(state, path + ('moe', 'router', 'router'),
                         jax.tree.map(np.asarray, router_vars))
  return jax.tree.map(jnp.asarray, params), jax.tree.map(jnp.asarray, state)
