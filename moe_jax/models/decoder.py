"""Decoder-only language model: LibMoE's LM stack and the Hugging Face
families (the `decoder` family of moe_jax/models, `from_config`).

  tokens [B, S] -> embed -> L x [x += Attn(N1 x); x += FFN(N2 x)] -> N -> logits
FFN is an MoEBlock in every layer (or a dense FFN). The defaults are
LibMoE's LM stack (algorithms.md §6.1): LayerNorm, causal multi-head
attention with partial rotary embeddings (rotate-half layout, base 10000,
half of each head's dims rotated), fused K/V projection, no biases, untied
embeddings, an output bias. The options cover Llama / Mistral, Qwen2/3,
Phi-3 and their MoE versions: RMSNorm, GQA / MQA, RoPE scaling
(models/rope.py), q/k/v(/o) biases, q/k RMSNorm, separate K/V projections,
tied embeddings. Init (§2.1): embedding
N(0, 1/d); Linear layers truncated normal with std sqrt(2 / (L fan_in));
LayerNorm 1 / 0; the MoE tensors as given by the block's std fields.

MoE++'s gating residual threads each MoE layer's router logits to the next.

A vision-language model (models/llava.py) passes `spliced=(mask, values)`:
the j-th masked position of row b takes values[b, j] instead of its token's
embedding (LLaVA's masked_scatter of image features), see `splice`.

Activation rematerialisation (`remat`, from the config's `train.remat`) wraps
every DecoderLayer in flax's lifted jax.checkpoint with one of REMAT_POLICIES;
the parameter tree is the same with and without it. The tensors the named
policies keep are tagged with jax.ad_checkpoint.checkpoint_name: 'query',
'key', 'value' (after RoPE) and 'attention_out' (the attention block's
output, before its residual add).

The layer loop (`layer_loop`, from `train.layer_loop`) is 'unrolled' (one
`layer_{i}` sub-tree per layer, L copies of the layer in the program) or
'scan': one flax nn.scan over a single DecoderLayer named 'layers' whose
parameters (and router state) are stacked on a leading [L] axis (logical
name 'layers'), so the program holds one layer and deep models compile
faster. The scan carries x and MoE++'s previous router logits, and returns
the same per-layer aux list; `stack_layer_params` / `unstack_layer_params`
convert between the two parameter layouts. Under scan each layer's router
rng is split from the 'router' stream (split_rngs), so noisy / dropout
routers draw different (equally distributed) noise than unrolled; and the
carried residual stream is float32 from the first layer on (unrolled: from
the second), so bf16 runs round the first residual add differently.

Dimension legend: B batch, S sequence, D model width, H heads, Dh head width,
L layers, V vocabulary, N spliced rows per sample.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import flax.linen as nn
import jax
from jax.ad_checkpoint import checkpoint_name
import jax.numpy as jnp
import ml_collections

from moe_jax.models.rope import apply_rope, inverse_frequencies, rotary_dims
from moe_jax.moe import layer as layer_lib
from moe_jax.moe import router as router_lib
from moe_jax.validation import require


def scaled_truncated_normal(num_layers: int):
  """Truncated normal with std sqrt(2 / (L * fan_in)) (LibMoE reset_prenorm_params)."""
  def init(key, shape, dtype=jnp.float32):
    std = math.sqrt(2.0 / (num_layers * shape[0]))
    # truncated_normal(-2, 2) has std 0.8796; rescale to the target std.
    return std / 0.87962566 * jax.random.truncated_normal(key, -2, 2, shape,
                                                           dtype)
  return init


NORMS = ('layernorm', 'rmsnorm')
ATTENTION_BIASES = ('none', 'qkv', 'all')
QK_NORMS = ('none', 'per_head', 'full')
KV_PROJECTIONS = ('fused', 'separate')
# train.layer_loop: a Python loop over `layer_{i}` or one nn.scan ('layers').
LAYER_LOOPS = ('unrolled', 'scan')
# The scanned layer's name and the logical name of its stacked [L] axis.
SCANNED = 'layers'

_POLICIES = jax.checkpoint_policies
# train.remat -> what each layer keeps for the backward pass (jax's
# checkpoint_policies); everything else is recomputed from the layer's input.
# 'none' keeps everything (no remat at all).
REMAT_POLICIES = {
    'none': None,
    # Only the layer inputs: the whole layer is recomputed (least memory).
    'full': _POLICIES.nothing_saveable,
    # Every dot_general output (q/k/v and output projections, attention
    # scores and context on the XLA path, router logits). Grouped expert
    # matmuls (ragged_dot, Pallas, blocked loops) are not dot_generals and
    # are recomputed.
    'save_dots': _POLICIES.dots_saveable,
    # Dots without batch dimensions: the projections and router logits, not
    # the attention scores / context (MaxText's 'minimal').
    'dots_with_no_batch_dims': _POLICIES.dots_with_no_batch_dims_saveable,
    # The q/k/v projections after RoPE (MaxText's 'save_qkv_proj').
    'save_qkv_proj': _POLICIES.save_only_these_names('query', 'key', 'value'),
    # The attention block's output (after its projection): the FFN half is
    # recomputed from it without the attention (which is still recomputed
    # for its own backward). About 'full''s memory.
    'save_attention_out': _POLICIES.save_only_these_names('attention_out'),
}


def remat_policy(name: str, field: str = 'remat'):
  """The jax.checkpoint policy of a REMAT_POLICIES name (None for 'none')."""
  require(name in REMAT_POLICIES, field, f'one of {tuple(REMAT_POLICIES)}',
          name)
  return REMAT_POLICIES[name]


def require_unrolled(config: ml_collections.ConfigDict, what: str) -> None:
  """Raises a ValueError naming train.layer_loop when it is not 'unrolled'
  (for tools that read `layer_{i}` parameters: HF import / export, ...)."""
  loop = config.train.get('layer_loop', 'unrolled')
  require(loop == 'unrolled', 'train.layer_loop',
          f"'unrolled' for {what} (it reads layer_{{i}} parameters)", loop)


def stack_layer_params(tree: Mapping[str, Any], num_layers: int
                       ) -> dict[str, Any]:
  """Unrolled layout -> scan layout: layer_0..layer_{L-1} become one
  SCANNED sub-tree whose leaves are stacked on a leading [L] axis.

  Works on any collection (params, router_state) of unboxed arrays; the
  other top-level entries are kept as they are. A collection without
  layer entries (a stateless router's empty router_state) is unchanged.
  """
  names = [f'layer_{i}' for i in range(num_layers)]
  if not any(n in tree for n in names):
    return dict(tree)
  out = {k: v for k, v in tree.items() if k not in names}
  out[SCANNED] = jax.tree.map(lambda *xs: jnp.stack(xs),
                              *[tree[n] for n in names])
  return out


def unstack_layer_params(tree: Mapping[str, Any], num_layers: int
                         ) -> dict[str, Any]:
  """The inverse of stack_layer_params: SCANNED [L, ...] -> layer_{i}."""
  if SCANNED not in tree:
    return dict(tree)
  out = {k: v for k, v in tree.items() if k != SCANNED}
  for i in range(num_layers):
    out[f'layer_{i}'] = jax.tree.map(lambda x, i=i: x[i], tree[SCANNED])
  return out


def norm_layer(kind: str, eps: float, name: str, axis_name: str = 'embed'):
  """float32 LayerNorm (scale, bias) or RMSNorm (scale), logically named."""
  scale = nn.with_logical_partitioning(nn.initializers.ones, (axis_name,))
  if kind == 'rmsnorm':
    return nn.RMSNorm(epsilon=eps, dtype=jnp.float32, name=name,
                      scale_init=scale)
  return nn.LayerNorm(
      epsilon=eps, dtype=jnp.float32, name=name, scale_init=scale,
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros,
                                             (axis_name,)))


def layer_norm(name: str) -> nn.LayerNorm:
  """LibMoE's float32 LayerNorm (eps 1e-6) with 'embed'-named params."""
  return norm_layer('layernorm', 1e-6, name)


def splice(x, mask, values):
  """x with the j-th True position of row b replaced by values[b, j].

  Args:
    x: [B, S, D] token embeddings.
    mask: [B, S] bool, the positions to replace (in order, per row).
    values: [B, N, D] the rows that fill them; a row with fewer than N True
      positions leaves the rest unused. True positions past the N-th (a
      caller error) get zeros.
  Returns:
    [B, S, D] in x's dtype.
  """
  mask = mask.astype(bool)
  index = jnp.cumsum(mask, axis=1, dtype=jnp.int32) - 1          # [B, S]
  rows = jnp.take_along_axis(values, index[..., None], axis=1,
                             mode='fill', fill_value=0)          # [B, S, D]
  return jnp.where(mask[..., None], rows.astype(x.dtype), x)


def constrain(x, names):
  """Logical sharding constraint (a no-op outside a mesh + rules context)."""
  return nn.with_logical_constraint(x, names)


def ffn_sublayer(x, ffn: Mapping[str, Any], *, dense: bool, dtype, train: bool,
                 step, prev_logits=None):
  """A pre-LN layer's FFN on its normed input x [B, S, D] -> (y, aux).

  DenseFFNBlock(**ffn) named 'ffn' when `dense`, else MoEBlock(**ffn) named
  'moe'. Called from a compact __call__, the block is the caller's child
  (the decoder's and the vision tower's layers share this).
  """
  if dense:
    return layer_lib.DenseFFNBlock(**ffn, dtype=dtype, name='ffn')(x)
  return layer_lib.MoEBlock(**ffn, dtype=dtype, name='moe')(
      x, train=train, step=step, prev_logits=prev_logits)


class Attention(nn.Module):
  """Causal attention with (partial) RoPE: x [B, S, D] -> [B, S, D].

  MHA, GQA or MQA (num_kv_heads); K and V from one fused projection
  ('key_value', LibMoE) or two ('key', 'value', Hugging Face); optional
  q/k/v(/o) biases and q/k RMSNorm per head (Qwen3) or over the whole
  projection (OLMoE), applied before RoPE.
  """

  num_heads: int
  head_dim: int
  num_layers: int
  num_kv_heads: int | None = None
  rope_fraction: float = 0.5
  rope_theta: float = 10000.0
  rope_scaling: Mapping[str, Any] | None = None
  bias: str = 'none'
  qk_norm: str = 'none'
  norm_eps: float = 1e-6
  kv_projection: str = 'fused'
  # Sliding-window attention: a query sees the keys of the last
  # `sliding_window` positions (itself included), as transformers' Mistral /
  # Phi-3 (q - k < window); None: every earlier key.
  sliding_window: int | None = None
  # 'xla' | 'cudnn' (fused; used only without a padding mask or window).
  implementation: str = 'xla'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, positions, mask=None):
    """x [B, S, D], positions [B, S], mask [B, 1, S, S] bool or None."""
    b, s, d = x.shape
    h, dh = self.num_heads, self.head_dim
    kv = self.num_kv_heads or h
    init = scaled_truncated_normal(self.num_layers)
    dense = lambda width, names, name, bias: nn.Dense(
        width, use_bias=bias, dtype=self.dtype, name=name,
        kernel_init=nn.with_logical_partitioning(init, names),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros,
                                               names[1:]))
    qkv_bias = self.bias != 'none'
    q = dense(h * dh, ('embed', 'heads'), 'query', qkv_bias)(x)
    if self.kv_projection == 'fused':
      both = dense(2 * kv * dh, ('embed', 'heads'), 'key_value', qkv_bias)(x)
      k, v = jnp.split(both, 2, axis=-1)
    else:
      k = dense(kv * dh, ('embed', 'heads'), 'key', qkv_bias)(x)
      v = dense(kv * dh, ('embed', 'heads'), 'value', qkv_bias)(x)
    if self.qk_norm == 'full':
      q = norm_layer('rmsnorm', self.norm_eps, 'q_norm', 'heads')(q)
      k = norm_layer('rmsnorm', self.norm_eps, 'k_norm', 'heads')(k)
    q, k, v = (q.reshape(b, s, h, dh), k.reshape(b, s, kv, dh),
               v.reshape(b, s, kv, dh))
    if self.qk_norm == 'per_head':
      q = norm_layer('rmsnorm', self.norm_eps, 'q_norm', None)(q)
      k = norm_layer('rmsnorm', self.norm_eps, 'k_norm', None)(k)
    q, k = q.astype(self.dtype), k.astype(self.dtype)
    rotate = rotary_dims(dh, self.rope_fraction)
    inv_freq, scale = inverse_frequencies(rotate, self.rope_theta,
                                          self.rope_scaling)
    q = apply_rope(q, positions, rotate, inv_freq, scale)
    k = apply_rope(k, positions, rotate, inv_freq, scale)
    q = checkpoint_name(q, 'query')
    k = checkpoint_name(k, 'key')
    v = checkpoint_name(v, 'value')
    window = self.sliding_window
    implementation = 'cudnn' if (self.implementation == 'cudnn' and
                                 mask is None and window is None) else 'xla'
    out = jax.nn.dot_product_attention(
        q, k, v, mask=mask, implementation=implementation, is_causal=True,
        local_window_size=None if window is None else (window - 1, 0)
    )                                                       # [B, S, H, Dh]
    return dense(d, ('heads', 'embed'), 'out', self.bias == 'all')(
        out.reshape(b, s, h * dh))


class DecoderLayer(nn.Module):
  num_heads: int
  head_dim: int
  num_layers: int
  ffn: Mapping[str, Any]
  dense_ffn: bool
  attention: Mapping[str, Any]
  norm: str = 'layernorm'
  norm_eps: float = 1e-6
  dtype: Any = jnp.float32

  # The arguments are positional so that nn.remat can mark `train` (a
  # Python bool the MoE block branches on) static: jax.checkpoint traces
  # keyword arguments.
  @nn.compact
  def __call__(self, x, positions, mask, train: bool = False, step=0,
               prev_logits=None):
    """x [B, S, D] -> (x [B, S, D], aux); see TransformerLM."""
    ln = lambda name: norm_layer(self.norm, self.norm_eps, name)
    attention_out = Attention(self.num_heads, self.head_dim, self.num_layers,
                              **self.attention, norm_eps=self.norm_eps,
                              dtype=self.dtype, name='attention')(
                                  ln('ln1')(x), positions, mask)
    x = x + checkpoint_name(attention_out, 'attention_out')
    y, aux = ffn_sublayer(ln('ln2')(x), self.ffn, dense=self.dense_ffn,
                          dtype=self.dtype, train=train, step=step,
                          prev_logits=prev_logits)
    return x + y, aux


class TransformerLM(nn.Module):
  """tokens [B, S] int32 -> (logits [B, S, V] float32, per-layer aux list).

  The defaults are LibMoE's LM stack; the other options are what the
  Hugging Face families need (moe_jax/convert sets them on import).
  """

  vocab_size: int
  d_model: int
  num_layers: int
  num_heads: int
  head_dim: int
  # MoEBlock (or DenseFFNBlock, with dense_ffn=True) keyword arguments.
  ffn: Mapping[str, Any]
  dense_ffn: bool = False
  # K/V heads: None = num_heads (MHA); fewer for GQA, 1 for MQA.
  num_kv_heads: int | None = None
  # Fraction of each head's dims that RoPE rotates (LibMoE 0.5, HF 1.0).
  rope_fraction: float = 0.5
  # RoPE base θ.
  rope_theta: float = 10000.0
  # None or a Hugging Face rope_scaling dict (models/rope.py SCHEMES).
  rope_scaling: Mapping[str, Any] | None = None
  # 'layernorm' (LibMoE) | 'rmsnorm' (Llama family).
  norm: str = 'layernorm'
  # Epsilon of every norm.
  norm_eps: float = 1e-6
  # Attention biases: 'none' | 'qkv' (Qwen2) | 'all' (q/k/v and output).
  attention_bias: str = 'none'
  # q/k RMSNorm: 'none' | 'per_head' (Qwen3) | 'full' (OLMoE).
  qk_norm: str = 'none'
  # K/V as one 'fused' projection (LibMoE) or 'separate' ones (HF).
  kv_projection: str = 'fused'
  # Sliding-window attention over the last N positions in every layer
  # (imported Mistral / Phi-3 models); None: full causal attention.
  sliding_window: int | None = None
  # Output layer = the embedding transposed (no separate weights).
  tie_embeddings: bool = False
  # A bias on the output layer (LibMoE has one).
  output_bias: bool = True
  # Activation rematerialisation of every layer, a key of REMAT_POLICIES.
  remat: str = 'none'
  # 'unrolled' (layer_{i}) | 'scan' (one nn.scan, params stacked under
  # SCANNED), a key of LAYER_LOOPS.
  layer_loop: str = 'unrolled'
  # dot_product_attention implementation: 'xla' | 'cudnn' (unmasked calls;
  # models/attention_probe.py resolves train.attention='auto').
  attention: str = 'xla'
  dtype: Any = jnp.float32

  def _validate(self):
    for name, allowed in (('norm', NORMS), ('attention_bias',
                                            ATTENTION_BIASES),
                          ('qk_norm', QK_NORMS),
                          ('kv_projection', KV_PROJECTIONS),
                          ('layer_loop', LAYER_LOOPS)):
      require(getattr(self, name) in allowed, name, f'one of {allowed}',
              getattr(self, name))
    remat_policy(self.remat)
    kv = self.num_kv_heads or self.num_heads
    require(self.num_heads % kv == 0, 'num_kv_heads',
            f'a divisor of num_heads={self.num_heads}', self.num_kv_heads)
    require(self.sliding_window is None or self.sliding_window >= 1,
            'sliding_window', 'None or an integer >= 1', self.sliding_window)

  def router_paths(self) -> list[tuple[str | int, ...]]:
    """Parameter path of the router behind each entry of the aux list.

    Under scan the path ends with the layer's index into the stacked [L]
    axis (train.router_post_update slices and updates it).
    """
    if self.dense_ffn:
      return []
    if self.layer_loop == 'scan':
      return [(SCANNED, 'moe', 'router', 'router', i)
              for i in range(self.num_layers)]
    return [(f'layer_{i}', 'moe', 'router', 'router')
            for i in range(self.num_layers)]

  def aux_groups(self) -> tuple[tuple[int, int], ...]:
    """Slices of the aux list whose losses are reduced together (one)."""
    return ((0, len(self.router_paths())),)

  @nn.compact
  def __call__(self, tokens, *, train: bool = False, step=0,
               attention_mask=None, spliced=None):
    """tokens [B, S]; attention_mask [B, S] (1 = token, 0 = padding) or None.

    Positions count from 0 at the first column whatever the padding (as
    Hugging Face does without position_ids), so pad on the right.
    spliced: None, or (mask [B, S] bool, values [B, N, D]): the masked
    positions take the rows of values in order (`splice`) instead of their
    token embedding; their token ids are not looked up (any id allowed).
    """
    self._validate()
    b, s = tokens.shape
    embed = self.param(
        'embedding', nn.with_logical_partitioning(
            nn.initializers.normal(1.0 / math.sqrt(self.d_model)),
            ('vocab', 'embed')), (self.vocab_size, self.d_model))
    if spliced is not None:
      # Image placeholders may lie outside the vocabulary: look up id 0.
      tokens = jnp.where(spliced[0], 0, tokens)
    x = jnp.take(embed, tokens, axis=0).astype(self.dtype)      # [B, S, D]
    if spliced is not None:
      x = splice(x, *spliced)
    x = constrain(x, ('batch', 'seq', 'embed'))
    positions = jnp.broadcast_to(jnp.arange(s), (b, s))
    mask = None
    if attention_mask is not None:
      mask = attention_mask.astype(bool)[:, None, None, :]      # [B,1,1,S]
    attention = dict(num_kv_heads=self.num_kv_heads,
                     rope_fraction=self.rope_fraction,
                     rope_theta=self.rope_theta,
                     rope_scaling=self.rope_scaling, bias=self.attention_bias,
                     qk_norm=self.qk_norm, kv_projection=self.kv_projection,
                     sliding_window=self.sliding_window,
                     implementation=self.attention)
    layer = DecoderLayer
    if self.remat != 'none':
      # static_argnums counts `self` as 0: 4 is `train`. The lifted
      # transform keeps the layer's name, so the parameter tree is unchanged.
      # prevent_cse only matters outside a scan (flax's advice).
      layer = nn.remat(DecoderLayer, policy=remat_policy(self.remat),
                       static_argnums=(4,),
                       prevent_cse=self.layer_loop != 'scan')
    make = lambda name: layer(self.num_heads, self.head_dim, self.num_layers,
                              self.ffn, self.dense_ffn, attention, self.norm,
                              self.norm_eps, self.dtype, name=name)
    if self.layer_loop == 'scan':
      x, auxes = self._scan_layers(make(SCANNED), x, positions, mask, train,
                                   step)
    else:
      auxes, prev_logits = [], None
      for i in range(self.num_layers):
        x, aux = make(f'layer_{i}')(x, positions, mask, train, step,
                                    prev_logits)
        x = constrain(x, ('batch', 'seq', 'embed'))
        prev_logits = aux.get('router_logits')
        auxes.append(aux)
    x = norm_layer(self.norm, self.norm_eps, 'ln_final')(x)
    if self.tie_embeddings:
      logits = jnp.einsum('bsd,vd->bsv', x.astype(jnp.float32),
                          embed.astype(jnp.float32))
    else:
      logits = nn.Dense(self.vocab_size, use_bias=self.output_bias,
                        dtype=jnp.float32, name='output',
                        kernel_init=nn.with_logical_partitioning(
                            scaled_truncated_normal(self.num_layers),
                            ('embed', 'vocab')),
                        bias_init=nn.with_logical_partitioning(
                            nn.initializers.zeros, ('vocab',)))(x)
    return constrain(logits, ('batch', 'seq', 'vocab')), auxes

  def _scan_layers(self, layer, x, positions, mask, train, step):
    """x [B, S, D] through L copies of `layer` under nn.scan -> (x, aux
    list): the list of per-layer aux dicts the unrolled loop returns."""
    prev_logits = None
    if not self.dense_ffn:
      # MoE++'s gating residual adds prev_logits @ G: zeros for the first
      # layer add exactly nothing (the unrolled loop passes None), and the
      # carry keeps one shape. Routers that ignore prev_logits ignore it.
      block = layer_lib.MoEBlock(**self.ffn, parent=None)
      width = router_lib.output_width(block.router, block.router_config())
      prev_logits = jnp.zeros((x.shape[0] * x.shape[1], width), jnp.float32)

    # The residual stream leaves every layer in float32 (the FFN half
    # returns its float32 LayerNorm input's dtype), and a scan carry keeps
    # one dtype: in bf16 / fp16 the first layer's attention residual add is
    # float32 here, in the compute dtype when unrolled (float32: identical).
    x = x.astype(jnp.float32)

    def body(module, carry, positions, mask, step):
      x, prev_logits = carry
      x, aux = module(x, positions, mask, train, step, prev_logits)
      x = constrain(x, ('batch', 'seq', 'embed'))
      if prev_logits is not None:
        prev_logits = aux['router_logits']
      return (x, prev_logits), aux

    scan = nn.scan(body, variable_axes={'params': 0, 'router_state': 0},
                   split_rngs={'params': True, 'router': True},
                   in_axes=(nn.broadcast, nn.broadcast, nn.broadcast),
                   length=self.num_layers,
                   metadata_params={nn.PARTITION_NAME: SCANNED})
    (x, _), stacked = scan(layer, (x, prev_logits), positions, mask, step)
    # {name: [L, ...]} -> one dict per layer, as the unrolled loop returns.
    return x, [jax.tree.map(lambda a, i=i: a[i], stacked)
               for i in range(self.num_layers)]


def ffn_kwargs(config: ml_collections.ConfigDict) -> dict:
  """The `ffn` dict of TransformerLM: plain MoEBlock / DenseFFNBlock kwargs."""
  sub = config.dense if config.model.dense_ffn else config.moe
  kwargs = sub.to_dict()
  if 'losses' in kwargs:
    kwargs['losses'] = tuple(kwargs['losses'])
  return kwargs


def from_config(config: ml_collections.ConfigDict) -> TransformerLM:
  """TransformerLM(**config.model, ffn=config.moe | config.dense, remat,
  layer_loop, dtype); remat = train.remat, layer_loop = train.layer_loop,
  dtype = train.dtype."""
  remat = config.train.remat
  remat_policy(remat, field='train.remat')
  layer_loop = config.train.layer_loop
  require(layer_loop in LAYER_LOOPS, 'train.layer_loop',
          f'one of {LAYER_LOOPS}', layer_loop)
  return TransformerLM(**config.model.to_dict(), ffn=ffn_kwargs(config),
                       remat=remat, layer_loop=layer_loop,
                       attention=config.train.attention,
                       dtype=jnp.dtype(config.train.dtype))


def uses_moe(config: ml_collections.ConfigDict) -> bool:
  """Whether the config's model has MoE layers (routers, aux losses)."""
  return not config.model.dense_ffn
