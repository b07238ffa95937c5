"""Decoder-only language model of LibMoE's LM stack (algorithms.md §6.1).

The `decoder` family of moe_jax/models (`from_config`).

  tokens [B, S] -> embed -> L x [x += Attn(LN1 x); x += FFN(LN2 x)] -> LN -> logits
FFN is an MoEBlock in every layer (or the dense baseline). Attention is causal
multi-head with partial rotary embeddings (rotate-half layout, base 10000, a
fraction of each head's dims rotated), fused K/V projection, no biases.
Embeddings are untied; the output layer has a bias. Init (§2.1): embedding
N(0, 1/d); Linear layers truncated normal with std sqrt(2 / (L fan_in));
LayerNorm 1 / 0; the MoE tensors as given by the block's std fields.

MoE++'s gating residual threads each MoE layer's router logits to the next.

Dimension legend: B batch, S sequence, D model width, H heads, Dh head width,
L layers, V vocabulary.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from moe_jax.moe import layer as layer_lib


def rotary_dims(head_dim: int, fraction: float) -> int:
  """Rotated dims per head: the even number <= fraction * head_dim (82 -> 40)."""
  return 2 * int(head_dim * fraction // 2)


def apply_partial_rope(x, positions, rotate: int, base: float = 10000.0):
  """Rotate-half RoPE on the first `rotate` dims: x [B, S, H, Dh] -> same."""
  if rotate == 0:
    return x
  half = rotate // 2
  inv_freq = base ** (-jnp.arange(half, dtype=jnp.float32) / half)   # [half]
  angle = positions[..., None].astype(jnp.float32) * inv_freq        # [B, S, half]
  cos = jnp.cos(angle)[:, :, None, :]
  sin = jnp.sin(angle)[:, :, None, :]
  x_rot, x_pass = x[..., :rotate].astype(jnp.float32), x[..., rotate:]
  x1, x2 = x_rot[..., :half], x_rot[..., half:]
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)
  return jnp.concatenate([rotated.astype(x.dtype), x_pass], axis=-1)


def scaled_truncated_normal(num_layers: int):
  """Truncated normal with std sqrt(2 / (L * fan_in)) (LibMoE reset_prenorm_params)."""
  def init(key, shape, dtype=jnp.float32):
    std = math.sqrt(2.0 / (num_layers * shape[0]))
    # truncated_normal(-2, 2) has std 0.8796; rescale to the target std.
    return std / 0.87962566 * jax.random.truncated_normal(key, -2, 2, shape,
                                                           dtype)
  return init


def layer_norm(name: str) -> nn.LayerNorm:
  """float32 LayerNorm with logically named ('embed') scale and bias."""
  return nn.LayerNorm(
      dtype=jnp.float32, name=name,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones, ('embed',)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros,
                                             ('embed',)))


def constrain(x, names):
  """Logical sharding constraint (a no-op outside a mesh + rules context)."""
  return nn.with_logical_constraint(x, names)


class Attention(nn.Module):
  """Causal MHA with partial RoPE: x [B, S, D] -> [B, S, D]."""

  num_heads: int
  head_dim: int
  num_layers: int
  rotate_fraction: float = 0.5
  rope_base: float = 10000.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, positions):
    b, s, d = x.shape
    h, dh = self.num_heads, self.head_dim
    init = scaled_truncated_normal(self.num_layers)
    dense = lambda width, names, name: nn.Dense(
        width, use_bias=False, dtype=self.dtype, name=name,
        kernel_init=nn.with_logical_partitioning(init, names))
    q = dense(h * dh, ('embed', 'heads'), 'query')(x).reshape(b, s, h, dh)
    kv = dense(2 * h * dh, ('embed', 'heads'), 'key_value')(x)
    k, v = jnp.split(kv.reshape(b, s, 2, h, dh), 2, axis=2)
    k, v = k[:, :, 0], v[:, :, 0]
    rotate = rotary_dims(dh, self.rotate_fraction)
    q = apply_partial_rope(q, positions, rotate, self.rope_base)
    k = apply_partial_rope(k, positions, rotate, self.rope_base)
    out = jax.nn.dot_product_attention(q, k, v, is_causal=True)  # [B, S, H, Dh]
    return dense(d, ('heads', 'embed'), 'out')(out.reshape(b, s, h * dh))


class DecoderLayer(nn.Module):
  num_heads: int
  head_dim: int
  num_layers: int
  ffn: Mapping[str, Any]
  dense_ffn: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, positions, *, train, step, prev_logits):
    ln = lambda name: layer_norm(name)
    x = x + Attention(self.num_heads, self.head_dim, self.num_layers,
                      dtype=self.dtype, name='attention')(ln('ln1')(x),
                                                          positions)
    if self.dense_ffn:
      y, aux = layer_lib.DenseFFNBlock(**self.ffn, dtype=self.dtype,
                                       name='ffn')(ln('ln2')(x))
    else:
      y, aux = layer_lib.MoEBlock(**self.ffn, dtype=self.dtype, name='moe')(
          ln('ln2')(x), train=train, step=step, prev_logits=prev_logits)
    return x + y, aux


class TransformerLM(nn.Module):
  """tokens [B, S] int32 -> (logits [B, S, V] float32, per-layer aux list)."""

  vocab_size: int
  d_model: int
  num_layers: int
  num_heads: int
  head_dim: int
  # MoEBlock (or DenseFFNBlock, with dense_ffn=True) keyword arguments.
  ffn: Mapping[str, Any]
  dense_ffn: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, tokens, *, train: bool = False, step=0):
    b, s = tokens.shape
    embed = self.param(
        'embedding', nn.with_logical_partitioning(
            nn.initializers.normal(1.0 / math.sqrt(self.d_model)),
            ('vocab', 'embed')), (self.vocab_size, self.d_model))
    x = jnp.take(embed, tokens, axis=0).astype(self.dtype)      # [B, S, D]
    x = constrain(x, ('batch', 'seq', 'embed'))
    positions = jnp.broadcast_to(jnp.arange(s), (b, s))
    auxes, prev_logits = [], None
    for i in range(self.num_layers):
      x, aux = DecoderLayer(self.num_heads, self.head_dim, self.num_layers,
                            self.ffn, self.dense_ffn, self.dtype,
                            name=f'layer_{i}')(x, positions, train=train,
                                               step=step,
                                               prev_logits=prev_logits)
      x = constrain(x, ('batch', 'seq', 'embed'))
      prev_logits = aux.get('router_logits')
      auxes.append(aux)
    x = layer_norm('ln_final')(x)
    logits = nn.Dense(self.vocab_size, dtype=jnp.float32, name='output',
                      kernel_init=nn.with_logical_partitioning(
                          scaled_truncated_normal(self.num_layers),
                          ('embed', 'vocab')),
                      bias_init=nn.with_logical_partitioning(
                          nn.initializers.zeros, ('vocab',)))(x)
    return constrain(logits, ('batch', 'seq', 'vocab')), auxes


def ffn_kwargs(config: ml_collections.ConfigDict) -> dict:
  """The `ffn` dict of TransformerLM: plain MoEBlock / DenseFFNBlock kwargs."""
  sub = config.dense if config.model.dense_ffn else config.moe
  kwargs = sub.to_dict()
  if 'losses' in kwargs:
    kwargs['losses'] = tuple(kwargs['losses'])
  return kwargs


def from_config(config: ml_collections.ConfigDict) -> TransformerLM:
  """TransformerLM(**config.model, ffn=config.moe | config.dense, dtype)."""
  return TransformerLM(**config.model.to_dict(), ffn=ffn_kwargs(config),
                       dtype=jnp.dtype(config.train.dtype))
