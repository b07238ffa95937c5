"""Rotary position embeddings: frequencies per scaling scheme, and rotation.

`inverse_frequencies(rotate, theta, scaling)` gives the [rotate / 2] inverse
frequencies of the rotated dims and the factor cos / sin are multiplied by,
for the schemes the Hugging Face families ship (their `rope_parameters` /
`rope_scaling` dicts):
  'default'  θ^(-2i / d)  (RoFormer; LibMoE's LM stack with d = rotated dims)
  'linear'   default / factor (position interpolation, Chen et al. 2023)
  'llama3'   Llama 3.1's band-wise rescaling of long wavelengths
  'yarn'     YaRN (Peng et al. 2023, arXiv 2309.00071): NTK-by-parts ramp
             between interpolation and extrapolation, cos / sin scaled by
             0.1 ln(factor) + 1 (or the mscale ratio DeepSeek uses)
The rotation is rotate-half on the first `rotate` dims of each head (LibMoE
and every Llama-family model).

Dimension legend: B batch, S sequence, H heads, Dh head width, R = rotate.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

SCHEMES = ('default', 'linear', 'llama3', 'yarn')


def rotary_dims(head_dim: int, fraction: float) -> int:
  """Rotated dims per head: the even number <= fraction * head_dim (82 -> 40)."""
  return 2 * int(head_dim * fraction // 2)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
  return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(base: np.ndarray, rotate: int, theta: float,
          p: Mapping[str, Any]) -> tuple[np.ndarray, float]:
  """YaRN: per-dim blend of interpolated and original frequencies."""
  factor = p['factor']
  original = p['original_max_position_embeddings']
  attention = p.get('attention_factor')
  if attention is None:
    if p.get('mscale') and p.get('mscale_all_dim'):
      attention = (_yarn_mscale(factor, p['mscale']) /
                   _yarn_mscale(factor, p['mscale_all_dim']))
    else:
      attention = _yarn_mscale(factor)
  beta_fast = p.get('beta_fast') or 32
  beta_slow = p.get('beta_slow') or 1

  def dim_of(rotations):
    # The dim whose wavelength makes `rotations` turns over `original`.
    return (rotate * math.log(original / (rotations * 2 * math.pi)) /
            (2 * math.log(theta)))

  low, high = dim_of(beta_fast), dim_of(beta_slow)
  if p.get('truncate', True):
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, rotate - 1)
  if low == high:
    high += 0.001
  ramp = np.clip((np.arange(rotate // 2, dtype=np.float32) - low) /
                 (high - low), 0, 1)
  extrapolate = 1 - ramp
  inv = (base / factor) * (1 - extrapolate) + base * extrapolate
  return inv.astype(np.float32), float(attention)


def _llama3(base: np.ndarray, p: Mapping[str, Any]) -> np.ndarray:
  factor, low, high = p['factor'], p['low_freq_factor'], p['high_freq_factor']
  original = p['original_max_position_embeddings']
  wavelen = 2 * math.pi / base
  # Long wavelengths are interpolated, short ones kept, the band between
  # blended smoothly.
  scaled = np.where(wavelen > original / low, base / factor, base)
  smooth = (original / wavelen - low) / (high - low)
  blended = (1 - smooth) * scaled / factor + smooth * scaled
  medium = (wavelen >= original / high) & (wavelen <= original / low)
  return np.where(medium, blended, scaled).astype(np.float32)


def inverse_frequencies(rotate: int, theta: float,
                        scaling: Mapping[str, Any] | None = None
                        ) -> tuple[np.ndarray, float]:
  """([R / 2] float32 inverse frequencies, cos/sin scale) of a scheme.

  Args:
    rotate: rotated dims per head R (even).
    theta: the base θ.
    scaling: None or {'rope_type': one of SCHEMES, and its fields as in the
      Hugging Face config: factor, low_freq_factor, high_freq_factor,
      original_max_position_embeddings, beta_fast, beta_slow, ...}.
  """
  base = (1.0 / theta ** (np.arange(0, rotate, 2, dtype=np.float32) /
                          rotate)).astype(np.float32)
  kind = (scaling or {}).get('rope_type', 'default')
  if kind == 'default':
    return base, 1.0
  if kind == 'linear':
    return (base / scaling['factor']).astype(np.float32), 1.0
  if kind == 'llama3':
    return _llama3(base, scaling), 1.0
  if kind == 'yarn':
    return _yarn(base, rotate, theta, scaling)
  raise ValueError(f'rope_scaling.rope_type: expected one of {SCHEMES}, got '
                   f'{kind!r}')


def apply_rope(x: jax.Array, positions: jax.Array, rotate: int,
               inv_freq: np.ndarray, scale: float = 1.0) -> jax.Array:
  """Rotate-half RoPE on the first `rotate` dims: x [B, S, H, Dh] -> same."""
  if rotate == 0:
    return x
  half = rotate // 2
  angle = (positions[..., None].astype(jnp.float32) *
           jnp.asarray(inv_freq))                              # [B, S, half]
  cos = (jnp.cos(angle) * scale)[:, :, None, :]
  sin = (jnp.sin(angle) * scale)[:, :, None, :]
  x_rot, x_pass = x[..., :rotate].astype(jnp.float32), x[..., rotate:]
  x1, x2 = x_rot[..., :half], x_rot[..., half:]
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)
  return jnp.concatenate([rotated.astype(x.dtype), x_pass], axis=-1)


def apply_partial_rope(x, positions, rotate: int, base: float = 10000.0):
  """LibMoE's RoPE: default frequencies θ^(-2i/R) on the first R dims."""
  inv_freq, _ = inverse_frequencies(rotate, base)
  return apply_rope(x, positions, rotate, inv_freq)
