"""LLaVA-style vision-language model: vision tower -> projector -> LLM.

  images [B, H, W, C] -> VisionTower (hidden_states[feature_layer]; S²
  multi-scale features when s2_scales != (1,)) -> features [B, N, D_v·s]
  -> projector (LLaVA's mlp2x_gelu: Linear D_v·s -> W, erf GELU,
  Linear W -> W; dense or MoE) -> [B, N, W]
  tokens [B, S] -> TransformerLM whose input embedding at the positions
  tokens == image_token_id takes the projected rows in order (LLaVA's
  masked_scatter, decoder.splice) -> logits [B, S, V]

The tower's MLPs and the projector are each a dense MLP or an MoEBlock
(LibMoE's VLM, algorithms.md §2.2, §10.1): both MoE sites share the `moe`
kwargs (router, E, k, router options, losses, shared experts, ...) and set
their own widths: the tower's MoE has d_model = D_v, expert_width = its MLP
width F_v and the tower's activation; the projector's MoE has d_model =
D_v·s, expert_width = d_out = W and activation 'gelu'; both have biases.

Parameters:
  vision/...                      VisionTower (models/vision.py)
  projector/ffn/ffn/{w_in [D_v·s, W], b_in [W], w_out [W, W], b_out [W]}
    | projector/moe/{router/router/..., experts/{w_in [E, D_v·s, W], b_in,
      w_out [E, W, W], b_out}, shared/...}
  llm/...                         TransformerLM (models/decoder.py)

The LLM is dense (llm['dense_ffn'] True; an MoE LLM is refused, as
config_lib refuses model.dense_ffn=False for a VLM): the MoE sites are the
tower and the projector, as in LibMoE's VLM. The aux list is the tower's
MoE auxes (per S² scale call, per layer), then the projector's;
`router_paths()` names the router behind each entry and `aux_groups()` the
slices train.py reduces separately (LibMoE: mean over the tower's layers x
scales, plus the projector's).

Each sample holds at most one image, whose N rows fill its image positions
in order; a sample without image positions ignores its image (give zeros).

Dimension legend: B batch, S sequence, H / W_img image height / width, C
channels, N image feature rows, D_v tower width, s number of S² scales, W
projector width = LLM width, V vocabulary, E experts.
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

# Module imports by full name: `from moe_jax.models import ...` would import
# the package, whose registry imports this module.
import moe_jax.models.decoder as decoder
import moe_jax.models.vision as vision
from moe_jax.moe import layer as layer_lib
from moe_jax.validation import require

FFN_KINDS = ('dense', 'moe')
# LLaVA's mlp2x_gelu / HF projector_hidden_act='gelu': erf GELU.
PROJECTOR_ACTIVATION = 'gelu'
ROUTER = ('moe', 'router', 'router')


class Projector(nn.Module):
  """mlp2x_gelu, dense or MoE: x [B, N, D_in] -> (y [B, N, W], aux | None)."""

  d_in: int
  width: int
  # 'dense' | 'moe'.
  kind: str = 'dense'
  # MoEBlock kwargs when kind='moe' (complete: widths set by the caller).
  moe: Mapping[str, Any] | None = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool = False, step=0):
    if self.kind == 'dense':
      y, _ = layer_lib.DenseFFNBlock(
          d_model=self.d_in, width=self.width, d_out=self.width,
          activation=PROJECTOR_ACTIVATION, use_bias=True, dtype=self.dtype,
          name='ffn')(x)
      return y, None
    return layer_lib.MoEBlock(**self.moe, dtype=self.dtype, name='moe')(
        x, train=train, step=step)


class Llava(nn.Module):
  """(tokens [B, S], images [B, H, W_img, C]) -> (logits [B, S, V], auxes)."""

  # VisionTower kwargs without ffn / dense_ffn / dtype.
  tower: Mapping[str, Any]
  # TransformerLM kwargs (with its `ffn` and dense_ffn=True), without dtype.
  llm: Mapping[str, Any]
  # Hidden and output width W of the projector (= the LLM's d_model).
  projector_width: int
  # Token id whose positions take the image rows (may lie outside the
  # vocabulary: such ids are never embedded).
  image_token_id: int
  # The tower's MLPs and the projector: 'dense' | 'moe'.
  tower_ffn: str = 'dense'
  projector_ffn: str = 'dense'
  # MoEBlock kwargs shared by the tower and projector MoE layers; the
  # widths, activation, expert_bias and d_out are set per site.
  moe: Mapping[str, Any] | None = None
  # S² scales (LibMoE v2: (1, 3)); (1,) is the plain tower.
  s2_scales: tuple[int, ...] = (1,)
  dtype: Any = jnp.float32

  def _validate(self):
    for name in ('tower_ffn', 'projector_ffn'):
      require(getattr(self, name) in FFN_KINDS, name, f'one of {FFN_KINDS}',
              getattr(self, name))
    require(self.moe is not None or 'moe' not in (self.tower_ffn,
                                                  self.projector_ffn),
            'moe', "MoEBlock kwargs when tower_ffn or projector_ffn is 'moe'",
            self.moe)
    require(bool(self.llm.get('dense_ffn')), 'llm.dense_ffn',
            "True (the VLM's LLM is dense; MoE sites are the tower and the "
            'projector: tower_ffn / projector_ffn)', self.llm.get('dense_ffn'))
    require(self.llm['d_model'] == self.projector_width, 'projector_width',
            f"the LLM's d_model={self.llm['d_model']}", self.projector_width)
    require(len(self.s2_scales) >= 1, 's2_scales', 'at least one scale',
            self.s2_scales)

  # ----------------------------------------------------------- the sites ---

  @property
  def projector_in(self) -> int:
    """D_v · s: the tower width times the number of S² scales."""
    return self.tower['d_model'] * len(self.s2_scales)

  def tower_moe_kwargs(self) -> dict[str, Any]:
    """MoEBlock kwargs of every tower MLP (the dense MLP's shapes)."""
    return dict(self.moe, d_model=self.tower['d_model'],
                expert_width=self.tower['mlp_width'],
                activation=self.tower['activation'], expert_bias=True,
                d_out=None)

  def projector_moe_kwargs(self) -> dict[str, Any]:
    """MoEBlock kwargs of the projector: D_v·s -> W -> W, GELU, biases."""
    return dict(self.moe, d_model=self.projector_in,
                expert_width=self.projector_width, d_out=self.projector_width,
                activation=PROJECTOR_ACTIVATION, expert_bias=True)

  def _tower(self) -> vision.VisionTower:
    moe = self.tower_ffn == 'moe'
    return vision.VisionTower(
        **self.tower, ffn=self.tower_moe_kwargs() if moe else None,
        dense_ffn=not moe, dtype=self.dtype, name='vision')

  # ----------------------------------------------- aux list bookkeeping ---

  def router_paths(self) -> list[tuple[str, ...]]:
    """Parameter path of the router behind each entry of the aux list."""
    paths = []
    if self.tower_ffn == 'moe':
      paths += [('vision', f'layer_{i}') + ROUTER
                for _ in self.s2_scales
                for i in range(self.tower['num_layers'])]
    if self.projector_ffn == 'moe':
      paths.append(('projector',) + ROUTER)
    return paths

  def aux_groups(self) -> tuple[tuple[int, int], ...]:
    """[start, stop) slices of the aux list reduced separately: the tower
    (layers x scales), the projector (non-empty ones only)."""
    sizes = [len(self.s2_scales) * self.tower['num_layers']
             if self.tower_ffn == 'moe' else 0,
             int(self.projector_ffn == 'moe')]
    groups, start = [], 0
    for size in sizes:
      if size:
        groups.append((start, start + size))
        start += size
    return tuple(groups)

  def example_inputs(self, seq_len: int) -> dict[str, Any]:
    """Inputs of model.init: one sample of `seq_len` tokens and an image."""
    size, channels = self.tower['image_size'], self.tower.get(
        'num_channels', 3)
    return {'tokens': jnp.zeros((1, seq_len), jnp.int32),
            'images': jnp.zeros((1, size, size, channels), jnp.float32)}

  # ------------------------------------------------------------- forward ---

  def image_rows(self, images, *, train: bool = False, step=0):
    """images [B, H, W_img, C] -> (projected rows [B, N, W], auxes)."""
    tower = self._tower()
    if tuple(self.s2_scales) == (1,):
      features, auxes = tower(images, train=train, step=step)  # [B, N, D_v]
    else:
      features, auxes = vision.multiscale_features(
          lambda crops: tower(crops, train=train, step=step), images,
          self.s2_scales)                                      # [B, N, D_v s]
    moe = self.projector_ffn == 'moe'
    rows, aux = Projector(self.projector_in, self.projector_width,
                          self.projector_ffn,
                          self.projector_moe_kwargs() if moe else None,
                          self.dtype, name='projector')(
                              features, train=train, step=step)
    return rows, list(auxes) + ([aux] if moe else [])

  @nn.compact
  def __call__(self, tokens, images=None, *, train: bool = False, step=0,
               attention_mask=None):
    """tokens [B, S] int32, images [B, H, W_img, C] float32 (preprocessed;
    None: text only) -> (logits [B, S, V] float32, auxes list)."""
    self._validate()
    auxes, spliced = [], None
    if images is not None:
      rows, auxes = self.image_rows(images, train=train, step=step)
      spliced = (tokens == self.image_token_id, rows)
    # The dense LLM's per-layer auxes hold no routing: not in the list.
    logits, _ = decoder.TransformerLM(
        **self.llm, dtype=self.dtype, name='llm')(
            tokens, train=train, step=step, attention_mask=attention_mask,
            spliced=spliced)
    return logits, auxes


# ------------------------------------------------------------- from config ---

def _moe_kwargs(config: ml_collections.ConfigDict) -> dict[str, Any]:
  kwargs = config.moe.to_dict()
  if kwargs.get('losses') is not None:
    kwargs['losses'] = tuple(kwargs['losses'])
  # Each site sets its own widths and activation (Llava.*_moe_kwargs).
  for name in ('d_model', 'expert_width', 'activation', 'expert_bias',
               'd_out'):
    kwargs.pop(name, None)
  return kwargs


def from_config(config: ml_collections.ConfigDict) -> Llava:
  """Llava of a VLM experiment config (layout: moe_jax/vlm_experiment.py):
  llm = config.model + config.dense (or config.moe), tower = config.vision,
  vlm fields, the MoE sites' shared kwargs = config.moe."""
  remat = config.train.remat
  decoder.remat_policy(remat, field='train.remat')
  llm = dict(config.model.to_dict(), ffn=decoder.ffn_kwargs(config),
             remat=remat, attention=config.train.attention)
  vlm = config.vlm
  uses = 'moe' in (vlm.tower_ffn, vlm.projector_ffn)
  return Llava(
      tower=config.vision.to_dict(), llm=llm,
      projector_width=int(vlm.projector_width),
      image_token_id=int(vlm.image_token_id), tower_ffn=vlm.tower_ffn,
      projector_ffn=vlm.projector_ffn,
      moe=_moe_kwargs(config) if uses else None,
      s2_scales=tuple(int(s) for s in vlm.s2_scales),
      dtype=jnp.dtype(config.train.dtype))


def uses_moe(config: ml_collections.ConfigDict) -> bool:
  """Whether the config's model has MoE layers (routers, aux losses): the
  tower's or the projector's (the LLM is dense, config_lib._validate_vlm)."""
  return 'moe' in (config.vlm.tower_ffn, config.vlm.projector_ffn)
