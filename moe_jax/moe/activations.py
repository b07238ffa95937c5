"""Expert and FFN activations, chosen by one string.

  'relu'       LibMoE LM experts (bias-free).
  'gelu'       erf GELU.
  'gelu_tanh'  tanh-approximate GELU (SigLIP, Phi MLPs).
  'quick_gelu' CLIP's sigmoid approximation x * sigmoid(1.702 x)
               (transformers' QuickGELUActivation).
  'swiglu'     Llama: silu(x W_gate) * (x W_up), with W_in = [W_gate | W_up],
               so the hidden pre-activation is twice the output width.

Dimension legend: F hidden width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

ACTIVATIONS = ('relu', 'gelu', 'gelu_tanh', 'quick_gelu', 'swiglu')


def check_activation(activation: str) -> None:
  if activation not in ACTIVATIONS:
    raise ValueError(
        f'activation: expected one of {ACTIVATIONS}, got {activation!r}')


def apply_activation(h: jax.Array, activation: str) -> jax.Array:
  """[..., F] (or [..., 2F] for swiglu) -> [..., F]."""
  if activation == 'relu':
    return jax.nn.relu(h)
  if activation == 'gelu':
    return jax.nn.gelu(h, approximate=False)
  if activation == 'gelu_tanh':
    return jax.nn.gelu(h, approximate=True)
  if activation == 'quick_gelu':
    return h * jax.nn.sigmoid(1.702 * h)
  if activation == 'swiglu':
    gate, up = jnp.split(h, 2, axis=-1)
    return jax.nn.silu(gate) * up
  raise ValueError(
      f'activation: expected one of {ACTIVATIONS}, got {activation!r}')
