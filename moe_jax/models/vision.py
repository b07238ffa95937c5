"""Vision towers: SigLIP and CLIP vision transformers, dense or MoE, and S².

  pixels [B, H, W, C] -> patch conv -> + position (+ CLIP class token,
  pre-LN) -> L x [x += Attn(LN1 x); x += FFN(LN2 x)] -> hidden state of
  `feature_layer` -> features [B, N, D]

The layers match transformers' SiglipVisionModel / CLIPVisionModel (v5):
pre-LN encoder layers with bidirectional multi-head attention (q/k/v/out
biases, scale Dh^-1/2), LayerNorm eps from the config, an MLP of width F.
The MLP is `layer_lib.DenseFFNBlock(name='ffn')` (with biases) when
`dense_ffn`, else `layer_lib.MoEBlock(name='moe')`: the same tree as the
decoder (models/decoder.py), so sparse upcycling (algorithms.md §10.1) copies
`layer_{i}/ffn/ffn/*` into `layer_{i}/moe/experts/*` generically.

Parameters (moe_jax/convert/vision_families.py maps them to HF keys):
  embeddings/patch/kernel [P, P, C, D]       (Conv, NHWC; HF [D, C, P, P])
  embeddings/patch/bias [D]                  (SigLIP only; CLIP's has none)
  embeddings/position [N(+1), D]             (CLIP: row 0 = class token's)
  embeddings/class_token [D]                 (CLIP only)
  pre_ln/{scale, bias}                       (CLIP only)
  layer_{i}/ln1, ln2 /{scale, bias}
  layer_{i}/attention/{query, key, value, out}/{kernel [D, D], bias [D]}
  layer_{i}/ffn/ffn/{w_in, b_in, w_out, b_out} | layer_{i}/moe/...
  post_ln/{scale, bias}   kept so that import / export is complete; LLaVA
                          features (hidden_states[-2]) never pass through it.

Hidden-state indexing follows HF `output_hidden_states`: 0 is the input of
layer 0 (embeddings; after pre-LN for CLIP), i the output of layer i, -1 the
last layer's. All layers run whatever `feature_layer` selects (LibMoE / CuMo
run the whole tower, so the last layer's MoE aux still counts).

Positions at another resolution (H or W != image_size) are the learned grid
resized bicubically exactly as HF `interpolate_pos_encoding` does
(torch F.interpolate bicubic, align_corners=False, A = -0.75, no antialias).

`multiscale_features` is S² (Shi et al. 2024, s2wrapper `forward`).

Dimension legend: B batch, H / W image height / width, C channels, P patch
size, N patches (tokens), D model width, Dh head width, F MLP width,
L layers, s an S² scale.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from moe_jax.models.decoder import constrain, ffn_sublayer, norm_layer
from moe_jax.moe import activations
from moe_jax.validation import require

KINDS = ('siglip', 'clip')
FEATURE_SELECTS = ('patch', 'full')
INIT_STD = 0.02
# torch's bicubic convolution coefficient (upsample_bicubic2d).
CUBIC_A = -0.75


# ---------------------------------------------------------------- resizing ---

def _cubic_weights(t: np.ndarray) -> np.ndarray:
  """Keys cubic weights of the taps at offsets -1, 0, 1, 2: [..., 4]."""
  a = CUBIC_A
  near = lambda x: ((a + 2) * x - (a + 3)) * x * x + 1       # |x| <= 1
  far = lambda x: ((a * x - 5 * a) * x + 8 * a) * x - 4 * a  # 1 < |x| < 2
  return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


def bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] float32 matrix of torch's bicubic resize along one axis.

  torch F.interpolate(mode='bicubic', align_corners=False, size=...):
  source x = (i + 0.5) n_in / n_out - 0.5 (not clamped), taps at
  floor(x) - 1 .. floor(x) + 2 clamped to the border, weights
  _cubic_weights(x - floor(x)). A 2D resize is separable: M_h X M_w^T.
  """
  scale = n_in / n_out
  x = (np.arange(n_out, dtype=np.float64) + 0.5) * scale - 0.5
  base = np.floor(x)
  w = _cubic_weights(x - base)                                # [n_out, 4]
  m = np.zeros((n_out, n_in), np.float64)
  for tap in range(4):
    idx = np.clip(base.astype(np.int64) - 1 + tap, 0, n_in - 1)
    np.add.at(m, (np.arange(n_out), idx), w[:, tap])
  return m.astype(np.float32)


def area_matrix(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] float32 matrix of torch's mode='area' (adaptive average
  pooling): row i averages inputs floor(i n_in / n_out) ..
  ceil((i + 1) n_in / n_out) - 1 (plain average pooling for integer
  factors)."""
  m = np.zeros((n_out, n_in), np.float32)
  for i in range(n_out):
    start = (i * n_in) // n_out
    stop = -((-(i + 1) * n_in) // n_out)
    m[i, start:stop] = 1.0 / (stop - start)
  return m


def resize_2d(x: jax.Array, size: tuple[int, int], method: str) -> jax.Array:
  """x [B, h, w, C] -> [B, h', w', C] ('bicubic' or 'area', as torch)."""
  require(method in ('bicubic', 'area'), 'method', "'bicubic' or 'area'",
          method)
  make = bicubic_matrix if method == 'bicubic' else area_matrix
  mh = jnp.asarray(make(x.shape[1], size[0]))                  # [h', h]
  mw = jnp.asarray(make(x.shape[2], size[1]))                  # [w', w]
  hi = jax.lax.Precision.HIGHEST
  x = jnp.einsum('ph,bhwc->bpwc', mh, x.astype(jnp.float32), precision=hi)
  return jnp.einsum('qw,bpwc->bpqc', mw, x, precision=hi)


# ------------------------------------------------------------------ layers ---

def _dense(width: int, names: tuple, name: str, dtype) -> nn.Dense:
  return nn.Dense(
      width, use_bias=True, dtype=dtype, name=name,
      kernel_init=nn.with_logical_partitioning(
          nn.initializers.normal(INIT_STD), names),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros,
                                             names[1:]))


class VisionAttention(nn.Module):
  """Bidirectional multi-head attention with biases: [B, N, D] -> [B, N, D]."""

  num_heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, n, d = x.shape
    h = self.num_heads
    dh = d // h
    q, k, v = (_dense(d, ('embed', 'heads'), name, self.dtype)(x).reshape(
        b, n, h, dh) for name in ('query', 'key', 'value'))    # [B, N, H, Dh]
    # Scale Dh^-1/2 (dot_product_attention's default), no mask.
    out = jax.nn.dot_product_attention(q, k, v, implementation='xla')
    return _dense(d, ('heads', 'embed'), 'out', self.dtype)(
        out.reshape(b, n, d))


class VisionLayer(nn.Module):
  """x += Attn(LN1 x); x += FFN(LN2 x): x [B, N, D] -> (x, aux)."""

  num_heads: int
  ffn: Mapping[str, Any]
  dense_ffn: bool
  norm_eps: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False, step=0, prev_logits=None):
    ln = lambda name: norm_layer('layernorm', self.norm_eps, name)
    x = x + VisionAttention(self.num_heads, self.dtype, name='attention')(
        ln('ln1')(x).astype(self.dtype))
    y, aux = ffn_sublayer(ln('ln2')(x), self.ffn, dense=self.dense_ffn,
                          dtype=self.dtype, train=train, step=step,
                          prev_logits=prev_logits)
    return x + y, aux


class VisionEmbeddings(nn.Module):
  """pixels [B, H, W, C] -> tokens [B, N(+1), D] (+ CLIP class token)."""

  kind: str
  image_size: int
  patch_size: int
  num_channels: int
  d_model: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, pixels):
    p, d = self.patch_size, self.d_model
    clip = self.kind == 'clip'
    patches = nn.Conv(
        d, (p, p), strides=(p, p), padding='VALID', use_bias=not clip,
        dtype=self.dtype, name='patch',
        kernel_init=nn.with_logical_partitioning(
            nn.initializers.normal(INIT_STD), (None, None, None, 'embed')),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros,
                                               ('embed',)))(
                                                   pixels.astype(self.dtype))
    b, gh, gw, _ = patches.shape                              # [B, h, w, D]
    x = patches.reshape(b, gh * gw, d)                        # [B, N, D]
    grid = self.image_size // p
    position = self.param(
        'position', nn.with_logical_partitioning(
            nn.initializers.normal(INIT_STD), (None, 'embed')),
        (grid * grid + int(clip), d))                        # [N(+1), D]
    patch_pos = position[int(clip):]                          # [N0, D]
    # HF interpolates unless the grid matches the checkpoint's and is square.
    if not (gh * gw == grid * grid and gh == gw):
      patch_pos = resize_2d(patch_pos.reshape(1, grid, grid, d), (gh, gw),
                            'bicubic').reshape(gh * gw, d)
    x = x + patch_pos.astype(x.dtype)[None]
    if clip:
      cls = self.param('class_token', nn.with_logical_partitioning(
          nn.initializers.normal(INIT_STD), ('embed',)), (d,))
      cls = (cls + position[0]).astype(x.dtype)
      x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, d)), x], axis=1)
    return x


class VisionTower(nn.Module):
  """pixels [B, H, W, C] float32 -> (features [B, N, D], MoE auxes).

  SigLIP ('siglip') or CLIP ('clip') vision transformer; see the module
  docstring for the parameter tree and hidden-state indexing.
  """

  # 'siglip' | 'clip'.
  kind: str
  # Training resolution (the position grid is image_size / patch_size).
  image_size: int
  patch_size: int
  d_model: int
  num_layers: int
  num_heads: int
  # Dense MLP width F (also the experts' width set by the caller).
  mlp_width: int
  # 'gelu_tanh' (SigLIP) | 'quick_gelu' (CLIP) | 'gelu'.
  activation: str
  # LayerNorm epsilon (HF layer_norm_eps).
  norm_eps: float
  num_channels: int = 3
  # MoEBlock kwargs when dense_ffn=False (the caller sets d_model,
  # expert_width, activation, expert_bias=True).
  ffn: Mapping[str, Any] | None = None
  dense_ffn: bool = True
  # HF hidden_states index: 0 embeddings, i after layer i, -1 the last.
  feature_layer: int = -2
  # 'patch' drops CLIP's class token (LLaVA 'default'); 'full' keeps it.
  feature_select: str = 'patch'
  dtype: Any = jnp.float32

  def _validate(self):
    require(self.kind in KINDS, 'kind', f'one of {KINDS}', self.kind)
    require(self.feature_select in FEATURE_SELECTS, 'feature_select',
            f'one of {FEATURE_SELECTS}', self.feature_select)
    require(-(self.num_layers + 1) <= self.feature_layer <= self.num_layers,
            'feature_layer',
            f'a hidden_states index in [{-(self.num_layers + 1)}, '
            f'{self.num_layers}]', self.feature_layer)
    require(self.d_model % self.num_heads == 0, 'num_heads',
            f'a divisor of d_model={self.d_model}', self.num_heads)
    require(self.image_size % self.patch_size == 0, 'patch_size',
            f'a divisor of image_size={self.image_size}', self.patch_size)
    require(self.dense_ffn or self.ffn is not None, 'ffn',
            'MoEBlock kwargs when dense_ffn=False', self.ffn)
    activations.check_activation(self.activation)

  def _ffn_kwargs(self) -> dict:
    if self.dense_ffn:
      return dict(d_model=self.d_model, width=self.mlp_width,
                  activation=self.activation, use_bias=True)
    return dict(self.ffn)

  @nn.compact
  def __call__(self, pixels, *, train: bool = False, step=0):
    """pixels [B, H, W, C] (preprocessed) -> (features [B, N, D], auxes).

    auxes: one MoE aux dict per layer in order; [] when dense_ffn.
    """
    self._validate()
    require(pixels.ndim == 4 and pixels.shape[-1] == self.num_channels,
            'pixels', f'[B, H, W, {self.num_channels}] (NHWC)', pixels.shape)
    x = VisionEmbeddings(self.kind, self.image_size, self.patch_size,
                         self.num_channels, self.d_model, self.dtype,
                         name='embeddings')(pixels)           # [B, N, D]
    if self.kind == 'clip':
      x = norm_layer('layernorm', self.norm_eps, 'pre_ln')(x).astype(
          self.dtype)
    x = constrain(x, ('batch', 'seq', 'embed'))
    hidden = [x]
    auxes, prev_logits = [], None
    ffn = self._ffn_kwargs()
    for i in range(self.num_layers):
      x, aux = VisionLayer(self.num_heads, ffn, self.dense_ffn,
                           self.norm_eps, self.dtype, name=f'layer_{i}')(
                               x, train, step, prev_logits)
      x = constrain(x, ('batch', 'seq', 'embed'))
      hidden.append(x)
      if not self.dense_ffn:
        prev_logits = aux.get('router_logits')
        auxes.append(aux)
    # Created (for import / export completeness) but not on the feature path.
    norm_layer('layernorm', self.norm_eps, 'post_ln')(x)
    features = hidden[self.feature_layer]
    if self.kind == 'clip' and self.feature_select == 'patch':
      features = features[:, 1:]
    return features, auxes


def num_features(kind: str, image_size: int, patch_size: int,
                 feature_select: str = 'patch') -> int:
  """N, the feature rows of one image at the tower's resolution."""
  n = (image_size // patch_size) ** 2
  return n + int(kind == 'clip' and feature_select == 'full')


# --------------------------------------------------------------- HF config ---

# model_type -> kind, and the HF config defaults a diff-saved config.json
# (LLaVA's nested vision_config) may omit (SiglipVisionConfig /
# CLIPVisionConfig, transformers 5).
MODEL_TYPES = {'siglip_vision_model': 'siglip', 'clip_vision_model': 'clip'}
HF_DEFAULTS = {
    'siglip': dict(hidden_size=768, intermediate_size=3072,
                   num_hidden_layers=12, num_attention_heads=12,
                   num_channels=3, image_size=224, patch_size=16,
                   hidden_act='gelu_pytorch_tanh', layer_norm_eps=1e-6),
    'clip': dict(hidden_size=768, intermediate_size=3072,
                 num_hidden_layers=12, num_attention_heads=12,
                 num_channels=3, image_size=224, patch_size=32,
                 hidden_act='quick_gelu', layer_norm_eps=1e-5),
}
# HF hidden_act -> moe_jax activation.
HF_ACTIVATIONS = {'gelu_pytorch_tanh': 'gelu_tanh', 'gelu_new': 'gelu_tanh',
                  'quick_gelu': 'quick_gelu', 'gelu': 'gelu'}


def tower_kwargs_from_hf(vision_config: Mapping[str, Any]) -> dict[str, Any]:
  """VisionTower kwargs of an HF SiglipVisionConfig / CLIPVisionConfig dict.

  Missing fields take the HF class defaults; ffn / dense_ffn / dtype /
  feature_* are left to the caller (the defaults: dense, hidden_states[-2],
  patch tokens).
  """
  model_type = vision_config.get('model_type')
  require(model_type in MODEL_TYPES, 'vision_config.model_type',
          f'one of {tuple(MODEL_TYPES)}', model_type)
  kind = MODEL_TYPES[model_type]
  hf = {**HF_DEFAULTS[kind], **{k: v for k, v in vision_config.items()
                                if v is not None}}
  require(hf['hidden_act'] in HF_ACTIVATIONS, 'vision_config.hidden_act',
          f'one of {tuple(HF_ACTIVATIONS)}', hf['hidden_act'])
  return dict(kind=kind, image_size=int(hf['image_size']),
              patch_size=int(hf['patch_size']),
              num_channels=int(hf['num_channels']),
              d_model=int(hf['hidden_size']),
              num_layers=int(hf['num_hidden_layers']),
              num_heads=int(hf['num_attention_heads']),
              mlp_width=int(hf['intermediate_size']),
              activation=HF_ACTIVATIONS[hf['hidden_act']],
              norm_eps=float(hf['layer_norm_eps']))


# ---------------------------------------------------------------------- S² ---

def multiscale_features(
    features_fn: Callable[[jax.Array], tuple[jax.Array, list]],
    pixels: jax.Array, scales: Sequence[int]) -> tuple[jax.Array, list]:
  """S² multi-scale features (Shi et al. 2024, s2wrapper `forward`).

  For each scale s (in order): resize the image to s H x s W (torch bicubic),
  split it into s x s crops of H x W (crop-major batch, as split_chessboard),
  run `features_fn` once on the s² B crops, merge the crops' h x w feature
  maps back into one s h x s w map (merge_chessboard) and area-pool it to
  h x w (average pooling for integer s; s2wrapper pools to its first
  scale's grid, which is h x w when scales start with 1). Scales are
  concatenated on channels (LibMoE --scales 1,3).

  Args:
    features_fn: crops [B', H, W, C] -> (features [B', h w, D], auxes list),
      e.g. a bound VisionTower with feature_select 'patch' (the token rows
      must form a square grid, so no class token).
    pixels: [B, H, W, C] float32.
    scales: integer scales, e.g. (1, 3).

  Returns:
    (features [B, h w, D len(scales)], the auxes of every call, in order).
  """
  require(len(scales) >= 1 and all(int(s) == s and s >= 1 for s in scales),
          'scales', 'integers >= 1', scales)
  b, hgt, wid, _ = pixels.shape
  outs, auxes = [], []
  for s in scales:
    s = int(s)
    x = pixels if s == 1 else resize_2d(pixels, (s * hgt, s * wid),
                                        'bicubic')
    crops = [x[:, i * hgt:(i + 1) * hgt, j * wid:(j + 1) * wid]
             for i in range(s) for j in range(s)]
    feats, aux = features_fn(jnp.concatenate(crops, axis=0))  # [s²B, N, D]
    auxes.extend(aux)
    n, d = feats.shape[1:]
    side = math.isqrt(n)
    require(side * side == n, 'features_fn', 'a square grid of feature '
            'rows (no class token)', n)
    maps = feats.reshape(s, s, b, side, side, d)              # [i, j, B, ...]
    merged = maps.transpose(2, 0, 3, 1, 4, 5).reshape(b, s * side, s * side,
                                                      d)
    # The base (crop) grid: s2wrapper pools to its first scale's grid, the
    # same thing whenever scales start with 1 (as LibMoE's 1,3 does).
    grid = side
    if s * side != grid:
      merged = resize_2d(merged, (grid, grid), 'area')
    outs.append(merged.reshape(b, grid * grid, d).astype(feats.dtype))
  return jnp.concatenate(outs, axis=-1), auxes
