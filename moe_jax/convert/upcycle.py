"""Sparse upcycling: a dense decoder's MLPs become MoE layers (algorithms.md
§10.1, Komatsuzaki et al. 2023, arXiv 2212.05055).

    kwargs, params, router_state = upcycle(dense_kwargs, dense_params,
                                           router='smoe', num_experts=8,
                                           top_k=2)

Every layer's dense SwiGLU MLP (w_in [D, 2I] = [gate | up], w_out [I, D])
is tiled into E routed experts (each an exact copy, plus optional Gaussian
noise of relative std `noise` to break the symmetry), shared experts start
as the dense MLP too, the router of any registered algorithm is initialised
by its own `init` with std 0.02 (LibMoE: N(0, 0.02²)), and everything else
(embedding, attention, norms, output) is copied.

Granularity G > 1 splits the dense MLP into G segments of width I / G along
its hidden units (DeepSeekMoE / Qwen-MoE fine-grained experts): expert e is
segment e mod G. Since the dense MLP is the *sum* of its segments, a
fine-grained model whose router picks a weighted subset does not compute the
dense function at step 0 (unlike G = 1): it is a starting point, not a
copy.

Function preservation (G = 1, no noise): routers whose weights sum to 1
over FFN experts reproduce the dense output exactly, since every expert is
the dense MLP: smoe, sigmoid (renormalised), xmoe, cosine, perturbed_cosine,
hyper, deepseek_v2 / deepseek_v3 with `shared_mix='half'` (0.5 shared + 0.5
routed). MoE++ (zero / copy / constant slots), TC-MoE (signed weights, null
slots) and ReMoE (ReLU weights) do not.

Router seeds: by default layer l's router is drawn from fold_in(key(seed), l).
`router_seed='libmoe'` reproduces LibMoE's torch.Generator seeded 42 in every
layer: all layers start with the same router (jax's generator, so the
values are not torch's).

Dimension legend: L layers, D model width, I dense MLP width, E experts,
G granularity, F = I / G expert width.
"""

from __future__ import annotations

import copy
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from moe_jax.models import decoder
from moe_jax.moe import router as router_lib
from moe_jax.validation import require

ROUTER_SEEDS = ('per_layer', 'libmoe')
# LibMoE's per-layer generator seed (llava_arch.py: torch.Generator(42)).
LIBMOE_ROUTER_SEED = 42
# Router init std of upcycled models (LibMoE std_gate).
ROUTER_STD = 0.02


def moe_ffn_kwargs(dense_ffn: Mapping[str, Any], *, router: str,
                   num_experts: int, top_k: int, granularity: int = 1,
                   shared_experts: int = 0, shared_mix: str = 'half',
                   router_options: Mapping[str, Any] | None = None,
                   losses: tuple[str, ...] | None = None,
                   backend: str = 'blocked') -> dict[str, Any]:
  """MoEBlock kwargs of the upcycled FFN of a dense SwiGLU FFN's kwargs."""
  width = dense_ffn['width']
  require(dense_ffn.get('activation') == 'swiglu', 'activation',
          "a SwiGLU dense MLP ('swiglu') to upcycle",
          dense_ffn.get('activation'))
  require(granularity >= 1 and width % granularity == 0, 'granularity',
          f'a divisor of the dense MLP width {width}', granularity)
  require(num_experts % granularity == 0, 'num_experts',
          f'a multiple of granularity={granularity}', num_experts)
  options = {'init_std': ROUTER_STD, **dict(router_options or {})}
  kwargs = dict(
      d_model=dense_ffn['d_model'], num_experts=num_experts, top_k=top_k,
      expert_width=width // granularity, router=router,
      router_options=options, activation='swiglu',
      expert_bias=bool(dense_ffn.get('use_bias', False)), backend=backend,
      shared_experts=shared_experts,
      shared_width=width if shared_experts else None,
      shared_mix=shared_mix if shared_experts else 'add',
      losses=losses)
  return kwargs


# Tensors of a dense MLP (experts.FFNParams names), in the order noise is
# drawn for them.
MLP_TENSORS = ('w_in', 'w_out', 'b_in', 'b_out')


def _hidden_columns(a: np.ndarray, cols: slice, width: int, swiglu: bool
                    ) -> np.ndarray:
  """Hidden units `cols` of w_in [..., I] or b_in (SwiGLU: [gate | up])."""
  if not swiglu:
    return a[..., cols]
  gate, up = a[..., :width], a[..., width:]
  return np.concatenate([gate[..., cols], up[..., cols]], axis=-1)


def segment_mlp(dense: Mapping[str, np.ndarray], g: int, granularity: int,
                activation: str = 'swiglu') -> dict[str, np.ndarray]:
  """Segment g of G of a dense MLP {w_in, w_out[, b_in, b_out]}.

  Hidden units [g F, (g + 1) F) with F = I / G: w_in [D, F] (SwiGLU:
  [D, 2F] = [gate_g | up_g]), b_in likewise, w_out [F, D']; b_out / G, so
  that the G segments sum to the dense MLP.
  """
  width = dense['w_out'].shape[0]
  f = width // granularity
  cols = slice(g * f, (g + 1) * f)
  swiglu = activation == 'swiglu'
  out = {'w_in': _hidden_columns(dense['w_in'], cols, width, swiglu),
         'w_out': dense['w_out'][cols]}
  if 'b_in' in dense:
    out['b_in'] = _hidden_columns(dense['b_in'], cols, width, swiglu)
  if 'b_out' in dense:
    out['b_out'] = dense['b_out'] / granularity
  return out


def segment(w_in: np.ndarray, w_out: np.ndarray, g: int, granularity: int
            ) -> tuple[np.ndarray, np.ndarray]:
  """Segment g of G of a SwiGLU MLP: ([D, 2F] = [gate_g | up_g], [F, D])."""
  part = segment_mlp({'w_in': w_in, 'w_out': w_out}, g, granularity)
  return part['w_in'], part['w_out']


def tile_experts(dense: Mapping[str, np.ndarray], *, num_experts: int,
                 granularity: int = 1, activation: str = 'swiglu',
                 noise: float = 0.0, rng: np.random.Generator | None = None
                 ) -> dict[str, np.ndarray]:
  """E experts from a dense MLP {w_in, w_out[, b_in, b_out]} (any
  activation): each tensor stacked to [E, ...] float32; expert e is segment
  e mod G (segment_mlp), plus Gaussian noise of std `noise` x the tensor's
  own std when noise > 0 (drawn per expert in MLP_TENSORS order)."""
  require(not noise or rng is not None, 'rng', 'a generator when noise > 0',
          rng)
  stacks: dict[str, list] = {name: [] for name in MLP_TENSORS
                             if name in dense}
  for e in range(num_experts):
    part = segment_mlp(dense, e % granularity, granularity, activation)
    for name in stacks:
      a = part[name]
      if noise:
        # Relative noise: std = noise x the tensor's own std.
        a = a + rng.normal(0.0, noise * a.std(), a.shape)
      stacks[name].append(a)
  return {name: np.stack(v).astype(np.float32) for name, v in stacks.items()}


def expert_weights(w_in: np.ndarray, w_out: np.ndarray, *, num_experts: int,
                   granularity: int, noise: float, rng: np.random.Generator
                   ) -> tuple[np.ndarray, np.ndarray]:
  """E experts from a dense SwiGLU MLP: ([E, D, 2F], [E, F, D]) float32."""
  tiled = tile_experts({'w_in': w_in, 'w_out': w_out},
                       num_experts=num_experts, granularity=granularity,
                       noise=noise, rng=rng)
  return tiled['w_in'], tiled['w_out']


def shared_weights(dense: Mapping[str, np.ndarray], num_shared: int,
                   activation: str = 'swiglu') -> dict[str, np.ndarray]:
  """The merged shared MLP of `num_shared` copies of a dense MLP, scaled to
  compute the dense function: hidden units side by side (SwiGLU: gates,
  then ups), w_out stacked and divided by n, b_in tiled, b_out as is."""
  width = dense['w_out'].shape[0]
  swiglu = activation == 'swiglu'

  def tile_hidden(a):
    if not swiglu:
      return np.concatenate([a] * num_shared, axis=-1)
    gate, up = a[..., :width], a[..., width:]
    return np.concatenate([gate] * num_shared + [up] * num_shared, axis=-1)

  out = {'w_in': tile_hidden(dense['w_in']),
         # n copies side by side compute n x dense: scale the output back.
         'w_out': np.concatenate([dense['w_out']] * num_shared,
                                 axis=0) / num_shared}
  if 'b_in' in dense:
    out['b_in'] = tile_hidden(dense['b_in'])
  if 'b_out' in dense:
    out['b_out'] = dense['b_out']
  return {k: np.asarray(v, np.float32) for k, v in out.items()}


def router_variables(router: str, cfg: router_lib.RouterConfig,
                     num_layers: int, *, seed: int, router_seed: str
                     ) -> list[tuple[dict, dict]]:
  """(params, state) of each layer's router, from the registry's init."""
  require(router_seed in ROUTER_SEEDS, 'router_seed', f'one of {ROUTER_SEEDS}',
          router_seed)
  spec = router_lib.ROUTERS[router]
  out = []
  for layer in range(num_layers):
    key = (jax.random.key(LIBMOE_ROUTER_SEED) if router_seed == 'libmoe'
           else jax.random.fold_in(jax.random.key(seed), layer))
    out.append(spec.init(key, cfg))
  return out


def upcycle(dense_kwargs: Mapping[str, Any], dense_params: Mapping, *,
            router: str, num_experts: int, top_k: int, granularity: int = 1,
            shared_experts: int = 0, shared_mix: str = 'half',
            noise: float = 0.0, seed: int = 0, router_seed: str = 'per_layer',
            router_options: Mapping[str, Any] | None = None,
            losses: tuple[str, ...] | None = None, backend: str = 'blocked'
            ) -> tuple[dict[str, Any], dict, dict]:
  """(MoE TransformerLM kwargs, params, router_state) of a dense decoder.

  Args:
    dense_kwargs: TransformerLM kwargs with dense_ffn=True and a SwiGLU
      `ffn` (an imported Llama-family model).
    dense_params: its parameters.
    router: a key of moe_jax.moe.router.ROUTERS.
    num_experts, top_k: E and k.
    granularity: G dense-MLP segments per expert set (module docstring).
    shared_experts: shared experts, each a copy of the dense MLP (their
      width is the dense width), mixed by `shared_mix` ('half': 0.5 shared +
      0.5 routed, function-preserving; 'add').
    noise: relative std of Gaussian noise added to each routed expert.
    seed: seed of the routers (per layer) and of the noise.
    router_seed: 'per_layer' | 'libmoe' (every layer from seed 42).
    router_options: RouterConfig fields beyond init_std=0.02.
    losses: the layer's loss names (None: the router's defaults).
    backend: the grouped-matmul backend.
  """
  require(bool(dense_kwargs.get('dense_ffn')), 'dense_ffn',
          'a dense model to upcycle', dense_kwargs.get('dense_ffn'))
  ffn = moe_ffn_kwargs(dense_kwargs['ffn'], router=router,
                       num_experts=num_experts, top_k=top_k,
                       granularity=granularity,
                       shared_experts=shared_experts, shared_mix=shared_mix,
                       router_options=router_options, losses=losses,
                       backend=backend)
  kwargs = dict(copy.deepcopy(dict(dense_kwargs)), dense_ffn=False, ffn=ffn)
  cfg = router_lib.make_config(router, num_experts=num_experts, top_k=top_k,
                               d_model=ffn['d_model'],
                               **ffn['router_options'])
  num_layers = kwargs['num_layers']
  routers = router_variables(router, cfg, num_layers, seed=seed,
                             router_seed=router_seed)
  # Parameters the dense model lacks (MoE++ constant experts, ...) come
  # from the MoE model's own init.
  model = decoder.TransformerLM(**kwargs)
  fresh = nn.unbox(jax.jit(lambda k: model.init(
      {'params': k, 'router': k}, jnp.zeros((1, 2), jnp.int32)))(
          jax.random.key(seed)))
  params = jax.tree.map(np.asarray, fresh['params'])
  router_state = jax.tree.map(np.asarray, dict(fresh.get('router_state',
                                                         {})))
  rng = np.random.default_rng(seed)
  for name, value in dense_params.items():
    if not name.startswith('layer_'):
      params[name] = jax.tree.map(np.asarray, value)
  for layer in range(num_layers):
    name = f'layer_{layer}'
    dense_layer = dense_params[name]
    moe = params[name]['moe']
    for part in dense_layer:
      if part != 'ffn':
        params[name][part] = jax.tree.map(np.asarray, dense_layer[part])
    w_in = np.asarray(dense_layer['ffn']['ffn']['w_in'], np.float32)
    w_out = np.asarray(dense_layer['ffn']['ffn']['w_out'], np.float32)
    moe['experts']['w_in'], moe['experts']['w_out'] = expert_weights(
        w_in, w_out, num_experts=num_experts, granularity=granularity,
        noise=noise, rng=rng)
    if shared_experts:
      moe['shared'].update(shared_weights({'w_in': w_in, 'w_out': w_out},
                                          shared_experts))
    router_params, state = routers[layer]
    moe['router']['router'] = jax.tree.map(np.asarray, router_params)
    if state:
      router_state[name]['moe']['router']['router'] = jax.tree.map(
          np.asarray, state)
  return (kwargs, jax.tree.map(jnp.asarray, params),
          jax.tree.map(jnp.asarray, router_state))
