"""Exporting a moe_jax decoder to a Hugging Face directory (formats.md §5).

    export_hf(kwargs, params, router_state, to='mixtral', out_dir=DIR)

writes `config.json` (v5 `rope_parameters` and the legacy `rope_theta` /
`rope_scaling` both), `generation_config.json`, the weights as safetensors
with the target's legacy per-expert keys (loadable by transformers 4.x and
5.x and vLLM; §4.3) and, when given, the tokenizer files. Targets:

  dense      Llama, Qwen2 or Qwen3 by the attention (q/k/v biases ->
             Qwen2, per-head q/k norm -> Qwen3, otherwise Llama)
  mixtral    softmax top-k renormalised (`smoe`), no shared expert, no
             attention biases
  qwen2_moe  softmax top-k (renormalised or not) with q/k/v biases (zeros
             when the model has none) and its sigmoid-gated shared expert:
             a model without one gets a zero shared expert; SharedE-V2's
             ungated 0.5 / 0.5 mix becomes gate weight 0 (σ(0) = 0.5) with
             the routed experts' down projections halved (§5.1)

A router or layout the chosen class cannot hold exactly is refused, naming
the classes that can. The directory is written whole or not at all (a
temporary directory renamed at the end).

Dimension legend: D model width, H heads, K kv heads, Dh head width, I MLP
width, E experts, F expert width.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any, Mapping

import numpy as np
from tqdm import tqdm

from moe_jax.convert import safetensors_io

TARGETS = ('dense', 'mixtral', 'qwen2_moe')
# moe_jax router -> the stock HF classes that hold it exactly (§5.1).
HOLDERS = {
    'smoe': ('mixtral', 'qwen2_moe', 'qwen3_moe', 'olmoe'),
    'deepseek_v2': ('qwen2_moe',),
    'sigmoid': ('glm4_moe (renormalised sigmoid, zero bias)',),
    'deepseek_v3': ('glm4_moe',),
}
TOKENIZER_FILES = ('tokenizer.json', 'tokenizer_config.json',
                   'special_tokens_map.json', 'tokenizer.model')


class ExportError(ValueError):
  """The model cannot be written as the requested class."""


def _np(a) -> np.ndarray:
  return np.asarray(a, np.float32)


def _torch(kernel) -> np.ndarray:
  """flax kernel (in, out) -> torch Linear weight (out, in)."""
  return np.ascontiguousarray(_np(kernel).T)


def _refuse(ok: bool, what: str, target: str, router: str | None) -> None:
  if ok:
    return
  holders = HOLDERS.get(router or '', ())
  hint = (f'classes that hold router {router!r}: {", ".join(holders)}'
          if holders else f'no stock Hugging Face class holds router '
          f'{router!r} exactly; it needs a trust_remote_code export')
  raise ExportError(f'--to={target}: {what}; {hint}')


def check_exportable(kwargs: Mapping[str, Any], target: str) -> None:
  """Raises ExportError naming what `target` cannot hold."""
  if target not in TARGETS:
    raise ExportError(f'--to: expected one of {TARGETS}, got {target!r}')
  ffn = kwargs['ffn']
  router = None if kwargs.get('dense_ffn') else ffn['router']
  _refuse(kwargs.get('norm') == 'rmsnorm', 'the model uses LayerNorm '
          '(LibMoE LM stack), every target uses RMSNorm', target, router)
  _refuse(kwargs.get('kv_projection') == 'separate' and
          not kwargs.get('output_bias', True),
          "LibMoE's fused K/V projection or output bias has no HF key",
          target, router)
  _refuse(kwargs.get('rope_fraction') == 1.0,
          f"RoPE rotates a fraction {kwargs.get('rope_fraction')} of each "
          'head; Llama-family targets rotate all of it', target, router)
  _refuse(ffn.get('activation') == 'swiglu' and
          not ffn.get('use_bias', ffn.get('expert_bias', False)),
          'only bias-free SwiGLU MLPs / experts have HF keys here', target,
          router)
  if target == 'dense':
    _refuse(bool(kwargs.get('dense_ffn')), 'an MoE model needs an MoE '
            'target', target, router)
    return
  _refuse(not kwargs.get('dense_ffn'), 'a dense model has no experts; use '
          '--to=dense', target, router)
  options = dict(ffn.get('router_options') or {})
  _refuse(not options.get('drop_top') and not any(
      (options.get('parity') or {}).values()),
          'DropTop and LibMoE parity flags change the routing', target,
          router)
  _refuse(kwargs.get('qk_norm', 'none') == 'none', 'q/k norms have no key '
          'in this class', target, router)
  if target == 'mixtral':
    _refuse(router == 'smoe' and options.get('normalize_topk', True),
            'Mixtral routes softmax top-k, renormalised', target, router)
    _refuse(not ffn.get('shared_experts'), 'Mixtral has no shared expert',
            target, router)
    _refuse(kwargs.get('attention_bias', 'none') == 'none',
            'Mixtral attention has no biases', target, router)
  if target == 'qwen2_moe':
    _refuse(router in ('smoe', 'deepseek_v2'),
            'Qwen2-MoE routes softmax top-k', target, router)
    _refuse(ffn.get('shared_experts', 0) <= 1,
            'Qwen2-MoE has one shared expert', target, router)
    _refuse(kwargs.get('attention_bias', 'none') in ('none', 'qkv'),
            'Qwen2-MoE has q/k/v biases and no output bias', target, router)


def _rope_fields(kwargs: Mapping[str, Any]) -> dict[str, Any]:
  scaling = dict(kwargs.get('rope_scaling') or {})
  params = {'rope_theta': kwargs.get('rope_theta', 10000.0),
            'rope_type': scaling.get('rope_type', 'default'), **scaling}
  return {'rope_parameters': params, 'rope_theta': params['rope_theta'],
          'rope_scaling': scaling or None}


def _common_config(kwargs: Mapping[str, Any],
                   extra: Mapping[str, Any]) -> dict[str, Any]:
  config = {
      'vocab_size': kwargs['vocab_size'], 'hidden_size': kwargs['d_model'],
      'num_hidden_layers': kwargs['num_layers'],
      'num_attention_heads': kwargs['num_heads'],
      'num_key_value_heads': kwargs.get('num_kv_heads') or kwargs['num_heads'],
      'head_dim': kwargs['head_dim'], 'hidden_act': 'silu',
      'rms_norm_eps': kwargs.get('norm_eps', 1e-6),
      'tie_word_embeddings': bool(kwargs.get('tie_embeddings')),
      'max_position_embeddings': 4096, 'initializer_range': 0.02,
      'use_cache': True, 'dtype': 'float32', **_rope_fields(kwargs)}
  config.update(extra)
  return config


def dense_architecture(kwargs: Mapping[str, Any]) -> tuple[str, str]:
  """(model_type, architecture) of a dense model by its attention."""
  if kwargs.get('qk_norm') == 'per_head':
    return 'qwen3', 'Qwen3ForCausalLM'
  if kwargs.get('attention_bias') == 'qkv':
    return 'qwen2', 'Qwen2ForCausalLM'
  return 'llama', 'LlamaForCausalLM'


def hf_config(kwargs: Mapping[str, Any], target: str,
              base: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """config.json of the export; `base` carries fields such as token ids."""
  extra = {k: v for k, v in (base or {}).items()
           if k in ('bos_token_id', 'eos_token_id', 'pad_token_id',
                    'max_position_embeddings')}
  ffn = kwargs['ffn']
  if target == 'dense':
    model_type, arch = dense_architecture(kwargs)
    extra.update(intermediate_size=ffn['width'])
    if model_type == 'llama':
      extra.update(attention_bias=kwargs.get('attention_bias') == 'all',
                   mlp_bias=False)
    if model_type == 'qwen3':
      extra.update(attention_bias=kwargs.get('attention_bias') == 'all')
  elif target == 'mixtral':
    model_type, arch = 'mixtral', 'MixtralForCausalLM'
    extra.update(num_local_experts=ffn['num_experts'],
                 num_experts_per_tok=ffn['top_k'],
                 intermediate_size=ffn['expert_width'],
                 router_jitter_noise=0.0, sliding_window=None,
                 output_router_logits=False)
  else:
    model_type, arch = 'qwen2_moe', 'Qwen2MoeForCausalLM'
    options = dict(ffn.get('router_options') or {})
    shared = ffn.get('shared_width') or ffn['expert_width']
    extra.update(num_experts=ffn['num_experts'],
                 num_experts_per_tok=ffn['top_k'],
                 moe_intermediate_size=ffn['expert_width'],
                 intermediate_size=ffn['expert_width'],
                 shared_expert_intermediate_size=(
                     shared * max(ffn.get('shared_experts', 0), 1)),
                 norm_topk_prob=bool(options.get('normalize_topk', True)),
                 decoder_sparse_step=1, mlp_only_layers=[],
                 use_sliding_window=False, output_router_logits=False)
  return _common_config(kwargs, dict(extra, model_type=model_type,
                                     architectures=[arch]))


def _attention(pre: str, att: Mapping, kwargs: Mapping[str, Any],
               zero_qkv_bias: bool) -> dict[str, np.ndarray]:
  out = {}
  for flax_name, name in (('query', 'q'), ('key', 'k'), ('value', 'v'),
                          ('out', 'o')):
    out[f'{pre}self_attn.{name}_proj.weight'] = _torch(att[flax_name]['kernel'])
    if 'bias' in att[flax_name]:
      out[f'{pre}self_attn.{name}_proj.bias'] = _np(att[flax_name]['bias'])
    elif zero_qkv_bias and name != 'o':
      width = np.shape(att[flax_name]['kernel'])[1]
      out[f'{pre}self_attn.{name}_proj.bias'] = np.zeros((width,), np.float32)
  for norm in ('q_norm', 'k_norm'):
    if norm in att:
      out[f'{pre}self_attn.{norm}.weight'] = _np(att[norm]['scale'])
  return out


def _swiglu(w_in, w_out) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """([D, 2F], [F, D]) -> torch (gate (F, D), up (F, D), down (D, F))."""
  w_in, w_out = _np(w_in), _np(w_out)
  f = w_out.shape[0]
  return (np.ascontiguousarray(w_in[:, :f].T),
          np.ascontiguousarray(w_in[:, f:].T), np.ascontiguousarray(w_out.T))


def _layer_ffn(pre: str, layer: Mapping, kwargs: Mapping[str, Any],
               target: str) -> dict[str, np.ndarray]:
  out = {}
  if target == 'dense':
    gate, up, down = _swiglu(layer['ffn']['ffn']['w_in'],
                             layer['ffn']['ffn']['w_out'])
    return {f'{pre}mlp.gate_proj.weight': gate,
            f'{pre}mlp.up_proj.weight': up, f'{pre}mlp.down_proj.weight': down}
  ffn, moe = kwargs['ffn'], layer['moe']
  router_w = _torch(moe['router']['router']['w'])              # [E, D]
  experts_in, experts_out = moe['experts']['w_in'], moe['experts']['w_out']
  if target == 'mixtral':
    out[f'{pre}block_sparse_moe.gate.weight'] = router_w
    for e in range(ffn['num_experts']):
      gate, up, down = _swiglu(experts_in[e], experts_out[e])
      base = f'{pre}block_sparse_moe.experts.{e}.'
      out.update({base + 'w1.weight': gate, base + 'w3.weight': up,
                  base + 'w2.weight': down})
    return out
  # Qwen2-MoE: out = Σ w routed + σ(x g) shared.
  half = ffn.get('shared_mix') == 'half' and ffn.get('shared_experts')
  out[f'{pre}mlp.gate.weight'] = router_w
  for e in range(ffn['num_experts']):
    gate, up, down = _swiglu(experts_in[e], experts_out[e])
    base = f'{pre}mlp.experts.{e}.'
    # 'half' mixes 0.5 routed: fold the 0.5 into each expert's output.
    out.update({base + 'gate_proj.weight': gate, base + 'up_proj.weight': up,
                base + 'down_proj.weight': down * 0.5 if half else down})
  d = kwargs['d_model']
  if ffn.get('shared_experts'):
    gate, up, down = _swiglu(moe['shared']['w_in'], moe['shared']['w_out'])
    if 'shared_gate' in moe:
      gate_w = _torch(moe['shared_gate']['kernel']
                      if isinstance(moe['shared_gate'], Mapping)
                      else moe['shared_gate'])
    else:
      # σ(0) = 0.5: 'half' is exactly a zero gate; 'add' needs weight 1,
      # i.e. the shared output doubled under the 0.5 gate.
      gate_w = np.zeros((1, d), np.float32)
      if not half:
        down = down * 2.0
  else:
    width = ffn['expert_width']
    gate = np.zeros((width, d), np.float32)
    up = np.zeros((width, d), np.float32)
    down = np.zeros((d, width), np.float32)
    gate_w = np.zeros((1, d), np.float32)
  out.update({f'{pre}mlp.shared_expert.gate_proj.weight': gate,
              f'{pre}mlp.shared_expert.up_proj.weight': up,
              f'{pre}mlp.shared_expert.down_proj.weight': down,
              f'{pre}mlp.shared_expert_gate.weight': gate_w})
  return out


def hf_tensors(kwargs: Mapping[str, Any], params: Mapping, target: str):
  """Yields (HF key, torch-layout array), one layer at a time."""
  zero_bias = target == 'qwen2_moe'
  yield 'model.embed_tokens.weight', _np(params['embedding'])
  for i in range(kwargs['num_layers']):
    layer, pre = params[f'layer_{i}'], f'model.layers.{i}.'
    tensors = {f'{pre}input_layernorm.weight': _np(layer['ln1']['scale']),
               f'{pre}post_attention_layernorm.weight':
                   _np(layer['ln2']['scale'])}
    tensors.update(_attention(pre, layer['attention'], kwargs, zero_bias))
    tensors.update(_layer_ffn(pre, layer, kwargs, target))
    yield from tensors.items()
  yield 'model.norm.weight', _np(params['ln_final']['scale'])
  if not kwargs.get('tie_embeddings'):
    yield 'lm_head.weight', _torch(params['output']['kernel'])


def _check_router_state(kwargs: Mapping[str, Any], router_state) -> None:
  """Stateful routers (a DeepSeek-V3 bias) need a class with a bias key."""
  if router_state and any(np.any(np.asarray(v) != 0) for v in
                          _leaves(router_state)):
    raise ExportError('the router state (a learnt selection bias) has no key '
                      'in this class; ' + ', '.join(HOLDERS.get(
                          kwargs['ffn'].get('router', ''), ())))


def _leaves(tree):
  if isinstance(tree, Mapping):
    for v in tree.values():
      yield from _leaves(v)
  else:
    yield tree


def export_hf(kwargs: Mapping[str, Any], params: Mapping, router_state,
              *, to: str, out_dir: str, tokenizer_dir: str | None = None,
              base_config: Mapping[str, Any] | None = None,
              max_shard_bytes: int = 5 * 2**30, progress: bool = True
              ) -> str:
  """Writes the HF directory `out_dir` (must not exist); returns it."""
  check_exportable(kwargs, to)
  if not kwargs.get('dense_ffn'):
    _check_router_state(kwargs, router_state)
  if os.path.exists(out_dir):
    raise FileExistsError(f'{out_dir} exists; export writes a new directory')
  parent = os.path.dirname(os.path.abspath(out_dir))
  os.makedirs(parent, exist_ok=True)
  staging = tempfile.mkdtemp(dir=parent, prefix='.export-')
  try:
    config = hf_config(kwargs, to, base_config)
    with open(os.path.join(staging, 'config.json'), 'w') as f:
      json.dump(config, f, indent=2, sort_keys=True)
    generation = {k: config[k] for k in ('bos_token_id', 'eos_token_id',
                                         'pad_token_id') if k in config}
    with open(os.path.join(staging, 'generation_config.json'), 'w') as f:
      json.dump({'_from_model_config': True, **generation}, f, indent=2)
    writer = safetensors_io.ShardedWriter(staging,
                                          max_shard_bytes=max_shard_bytes)
    with writer:
      for key, array in tqdm(hf_tensors(kwargs, params, to), desc='export',
                             unit='tensor', disable=not progress):
        writer.add(key, array)
    for name in TOKENIZER_FILES:
      if tokenizer_dir and os.path.isfile(os.path.join(tokenizer_dir, name)):
        shutil.copy2(os.path.join(tokenizer_dir, name), staging)
    os.replace(staging, out_dir)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
  return out_dir
