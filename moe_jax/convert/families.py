"""Hugging Face dense decoder families: config and key tables (formats.md §3).

For each family, `model_kwargs(hf_config)` gives the TransformerLM keyword
arguments (moe_jax/models/decoder.py) of an HF `config.json`, and
`key_table(hf_config)` the list of `Entry(hf_key, path, to_jax)`: where each
tensor of the checkpoint goes in the flax parameter tree and how it is laid
out there. Linear weights are torch (out, in) on disk and flax (in, out)
kernels here; the Llama MLP's gate and up projections become the dense
FFN's one `w_in` [D, 2I] = [gate | up] (SwiGLU); Phi-3's fused qkv and
gate_up projections are split / kept along the same axes.

Families: Llama (also Mistral), Qwen2 (q/k/v biases), Qwen3 (per-head q/k
RMSNorm), Phi-3 (fused qkv and gate_up).

Sliding-window attention: Mistral's and Phi-3's window covers every layer
and becomes TransformerLM(sliding_window=N) when it is narrower than the
context (`sliding_window` < max_position_embeddings; real Phi-3-mini-4k:
2047 of 4096); a window at least the context masks nothing and is dropped.
Qwen2 / Qwen3 window only the layers `layer_types` / `max_window_layers`
mark sliding (with `use_sliding_window`), which moe_jax does not express.

Refused, each with an error naming the config.json field: a Qwen2 / Qwen3
sliding window narrower than the context, a `hidden_act` other than silu,
`mlp_bias` (Llama's MLP biases) and a `partial_rotary_factor` that rotates
an odd number of dims per head (transformers rounds that up to the next
even width, moe_jax down).

Dimension legend: V vocabulary, D model width, H heads, K kv heads, Dh head
width, I MLP width.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import numpy as np

# architectures[0] of config.json -> family.
ARCHITECTURES = {
    'LlamaForCausalLM': 'llama',
    'MistralForCausalLM': 'llama',
    'Qwen2ForCausalLM': 'qwen2',
    'Qwen3ForCausalLM': 'qwen3',
    'Phi3ForCausalLM': 'phi3',
}


@dataclasses.dataclass(frozen=True)
class Entry:
  """One flax parameter: the HF tensor(s) it is made of, and how.

  hf_keys: the checkpoint keys read (two for Llama's gate + up -> w_in; one
    fused key may feed several entries, as Phi-3's qkv_proj does).
  path: the flax parameter path.
  shapes: each HF tensor's shape on disk.
  to_jax: (*hf arrays) -> the flax array.
  """

  hf_keys: tuple[str, ...]
  path: tuple[str, ...]
  shapes: tuple[tuple[int, ...], ...]
  to_jax: Callable[..., np.ndarray]


def entry(hf_key: str, path: tuple[str, ...], shape: tuple[int, ...],
          to_jax: Callable[[np.ndarray], np.ndarray]) -> Entry:
  """An Entry made of one HF tensor."""
  return Entry((hf_key,), path, (shape,), to_jax)


def family_of(hf_config: Mapping[str, Any], source: str) -> str:
  """The family of an HF config (architectures[0]); errors name the file."""
  archs = hf_config.get('architectures') or []
  if not archs or archs[0] not in ARCHITECTURES:
    raise ValueError(
        f'{source}: architectures {archs} is not one moe_jax imports; '
        f'supported: {sorted(ARCHITECTURES)}')
  return ARCHITECTURES[archs[0]]


def _rope(hf: Mapping[str, Any]) -> dict[str, Any]:
  """rope_theta, rope_scaling and rotated fraction from v5 or legacy keys."""
  params = dict(hf.get('rope_parameters') or {})
  legacy = dict(hf.get('rope_scaling') or {})
  theta = params.get('rope_theta', hf.get('rope_theta', 10000.0))
  scaling = {k: v for k, v in (params or legacy).items()
             if k not in ('rope_theta', 'partial_rotary_factor')}
  if 'type' in scaling and 'rope_type' not in scaling:
    scaling['rope_type'] = scaling.pop('type')
  kind = scaling.get('rope_type', 'default')
  if kind not in ('default', 'linear', 'llama3', 'yarn'):
    raise ValueError(f'config.json rope_type {kind!r}: moe_jax implements '
                     "'default', 'linear', 'llama3' and 'yarn'")
  if kind == 'yarn':
    scaling.setdefault('original_max_position_embeddings',
                       hf.get('original_max_position_embeddings') or
                       hf['max_position_embeddings'])
  fraction = params.get('partial_rotary_factor',
                        hf.get('partial_rotary_factor', 1.0))
  check_rotary(hf, float(fraction))
  return {'rope_theta': float(theta), 'rope_fraction': float(fraction),
          'rope_scaling': scaling if kind != 'default' else None}


def check_rotary(hf: Mapping[str, Any], fraction: float) -> None:
  """Refuses a partial_rotary_factor that rotates an odd number of dims.

  transformers rotates int(Dh · factor) dims, rounded up to an even width
  by its arange(0, dims, 2) frequencies (Phi-3: 9 -> 10); moe_jax rotates
  the even number below (models/rope.rotary_dims, 9 -> 8): the two agree
  only on an even width.
  """
  head_dim = hf.get('head_dim') or (hf['hidden_size'] //
                                    hf['num_attention_heads'])
  rotated = int(head_dim * fraction)
  if rotated % 2:
    raise ValueError(
        f'config.json partial_rotary_factor={fraction}: head_dim={head_dim}'
        f' x {fraction} = {rotated} rotated dims per head is odd; moe_jax '
        'rotates an even number of dims (expected a factor giving an even '
        'width)')


def sliding_window(hf: Mapping[str, Any], family: str) -> int | None:
  """The attention window transformers applies to some layer, or None.

  Qwen2 / Qwen3 keep a `sliding_window` value that only takes effect with
  `use_sliding_window`, and then only in the layers that `layer_types`
  marks 'sliding_attention' (Qwen2Config / Qwen3Config default: layer index
  >= `max_window_layers`). Llama / Mistral / Phi-3 window every layer.
  (The Qwen MoE configs lay their windows out otherwise: moe_families.py.)
  """
  window = hf.get('sliding_window')
  if family in ('qwen2', 'qwen3'):
    if not hf.get('use_sliding_window'):
      return None
    types = hf.get('layer_types') or [
        'sliding_attention' if i >= hf.get('max_window_layers', 28)
        else 'full_attention' for i in range(hf['num_hidden_layers'])]
    if 'sliding_attention' not in types:
      return None
  return window


def check_window(hf: Mapping[str, Any], family: str) -> int | None:
  """The every-layer window the model needs, or None (see module doc).

  A window of at least max_position_embeddings never masks a token the
  model can see (transformers keeps keys with q - k < window): None.

  Raises:
    ValueError: a Qwen2 / Qwen3 window narrower than the context (it
      applies to some layers only).
  """
  window = sliding_window(hf, family)
  context = hf.get('max_position_embeddings', 0)
  if window is None or window >= context:
    return None
  if family in ('qwen2', 'qwen3'):
    raise ValueError(
        f'config.json sliding_window={window} with use_sliding_window=true: '
        f'narrower than max_position_embeddings={context}, in the layers '
        'layer_types / max_window_layers mark sliding; moe_jax windows every '
        'layer or none (expected use_sliding_window false or a window >= '
        'max_position_embeddings)')
  return int(window)


def dims(hf: Mapping[str, Any]) -> dict[str, int]:
  heads = hf['num_attention_heads']
  return {'V': hf['vocab_size'], 'D': hf['hidden_size'], 'H': heads,
          'K': hf.get('num_key_value_heads') or heads,
          'Dh': hf.get('head_dim') or hf['hidden_size'] // heads,
          'I': hf['intermediate_size'], 'L': hf['num_hidden_layers']}


def model_kwargs(hf: Mapping[str, Any], family: str) -> dict[str, Any]:
  """TransformerLM keyword arguments (with a dense SwiGLU FFN)."""
  if hf.get('hidden_act', 'silu') != 'silu':
    raise ValueError(f"config.json hidden_act {hf['hidden_act']!r}: the "
                     f"{family} family's MLP is SwiGLU ('silu')")
  if hf.get('mlp_bias'):
    raise ValueError(f"config.json mlp_bias={hf['mlp_bias']!r}: the "
                     f"{family} family's MLP is imported bias-free "
                     '(expected false)')
  window = check_window(hf, family)
  d = dims(hf)
  bias = 'none'
  if family == 'qwen2':
    bias = 'qkv'
  elif hf.get('attention_bias'):
    bias = 'all'
  return dict(
      vocab_size=d['V'], d_model=d['D'], num_layers=d['L'],
      num_heads=d['H'], head_dim=d['Dh'], num_kv_heads=d['K'],
      dense_ffn=True,
      ffn=dict(d_model=d['D'], width=d['I'], activation='swiglu',
               use_bias=False),
      norm='rmsnorm', norm_eps=float(hf.get('rms_norm_eps', 1e-6)),
      attention_bias=bias,
      qk_norm='per_head' if family == 'qwen3' else 'none',
      kv_projection='separate',
      tie_embeddings=bool(hf.get('tie_word_embeddings', False)),
      output_bias=False, **_rope(hf),
      **({'sliding_window': window} if window else {}))


def _t(a: np.ndarray) -> np.ndarray:
  """torch Linear (out, in) -> flax kernel (in, out)."""
  return np.ascontiguousarray(a.T)


def _identity(a: np.ndarray) -> np.ndarray:
  return a


def _rows(start: int, stop: int) -> Callable[[np.ndarray], np.ndarray]:
  """Rows [start, stop) of a fused (out, in) weight, as a flax kernel."""
  return lambda a: np.ascontiguousarray(a[start:stop].T)


def key_table(hf: Mapping[str, Any], family: str) -> list[Entry]:
  """Every tensor of the family's checkpoint and where it goes."""
  d = dims(hf)
  D, H, K, Dh, I = d['D'], d['H'], d['K'], d['Dh'], d['I']
  kw = model_kwargs(hf, family)
  out = [entry('model.embed_tokens.weight', ('embedding',), (d['V'], D),
               _identity),
         entry('model.norm.weight', ('ln_final', 'scale'), (D,), _identity)]
  if not kw['tie_embeddings']:
    out.append(entry('lm_head.weight', ('output', 'kernel'), (d['V'], D),
                     _t))
  for i in range(d['L']):
    pre, layer = f'model.layers.{i}.', f'layer_{i}'
    att = (layer, 'attention')
    out += [
        entry(pre + 'input_layernorm.weight', (layer, 'ln1', 'scale'), (D,),
              _identity),
        entry(pre + 'post_attention_layernorm.weight',
              (layer, 'ln2', 'scale'), (D,), _identity),
        entry(pre + 'self_attn.o_proj.weight', att + ('out', 'kernel'),
              (D, H * Dh), _t),
        entry(pre + 'mlp.down_proj.weight', (layer, 'ffn', 'ffn', 'w_out'),
              (D, I), _t),
    ]
    if family == 'phi3':
      fused = pre + 'self_attn.qkv_proj.weight'
      rows = (H + 2 * K) * Dh
      out += [
          entry(fused, att + ('query', 'kernel'), (rows, D),
                _rows(0, H * Dh)),
          entry(fused, att + ('key', 'kernel'), (rows, D),
                _rows(H * Dh, (H + K) * Dh)),
          entry(fused, att + ('value', 'kernel'), (rows, D),
                _rows((H + K) * Dh, rows)),
          # Gate rows first, then up: exactly w_in's [gate | up] columns.
          entry(pre + 'mlp.gate_up_proj.weight',
                (layer, 'ffn', 'ffn', 'w_in'), (2 * I, D), _t),
      ]
      continue
    for name, flax_name, width in (('q', 'query', H * Dh),
                                   ('k', 'key', K * Dh),
                                   ('v', 'value', K * Dh)):
      out.append(entry(pre + f'self_attn.{name}_proj.weight',
                       att + (flax_name, 'kernel'), (width, D), _t))
      if kw['attention_bias'] != 'none':
        out.append(entry(pre + f'self_attn.{name}_proj.bias',
                         att + (flax_name, 'bias'), (width,), _identity))
    if kw['attention_bias'] == 'all':
      out.append(entry(pre + 'self_attn.o_proj.bias', att + ('out', 'bias'),
                       (D,), _identity))
    if kw['qk_norm'] == 'per_head':
      out += [entry(pre + 'self_attn.q_norm.weight', att + ('q_norm', 'scale'),
                    (Dh,), _identity),
              entry(pre + 'self_attn.k_norm.weight', att + ('k_norm', 'scale'),
                    (Dh,), _identity)]
    # gate and up are two tensors on disk and one w_in [D, 2I] here.
    out.append(Entry(
        (pre + 'mlp.gate_proj.weight', pre + 'mlp.up_proj.weight'),
        (layer, 'ffn', 'ffn', 'w_in'), ((I, D), (I, D)),
        lambda gate, up: np.concatenate([gate.T, up.T], axis=1)))
  return out
