"""Exporting a moe_jax decoder to a Hugging Face directory (formats.md §5).

    export_hf(kwargs, params, router_state, to='mixtral', out_dir=DIR)

writes `config.json` (v5 `rope_parameters` and the legacy `rope_theta` /
`rope_scaling` both), `generation_config.json`, the weights as safetensors
with the target's legacy per-expert keys (loadable by transformers 4.x and
5.x and vLLM; §4.3) and, when given, the tokenizer files. The MoE targets
write exactly what moe_families.py imports (`norm_topk_prob` always).
Targets:

  dense      Llama, Qwen2 or Qwen3 by the attention (q/k/v biases ->
             Qwen2, per-head q/k norm -> Qwen3, otherwise Llama). Qwen3's
             `attention_bias` gives q/k/v AND o_proj biases: a per-head
             normed model with q/k/v biases only gets a zero o_proj bias.
             q/k norm over the whole projection (qk_norm='full') has no
             dense class and is refused.
  phi3       Phi-3: fused qkv_proj and gate_up_proj, partial rotary factor
             (an even number of rotated dims per head), no rope_scaling
             (Phi-3 reads only longrope, which moe_jax does not implement)
  mixtral    softmax top-k renormalised (`smoe`), no shared expert, no
             attention biases, no q/k norms
  qwen2_moe  softmax top-k (renormalised or not) with q/k/v biases (zeros
             when the model has none) and its sigmoid-gated shared expert:
             a model without one gets a zero shared expert, n shared
             experts one shared MLP of width n·w (they are merged under one
             gate); SharedE-V2's ungated 0.5 / 0.5 mix becomes gate weight
             0 (σ(0) = 0.5) with the routed experts' down projections
             halved (§5.1)
  qwen3_moe  softmax top-k (renormalised or not), no shared expert,
             per-head q/k RMSNorm (required: Qwen3-MoE always has it);
             `attention_bias` gives q/k/v AND o_proj biases, so a model
             with q/k/v biases only gets a zero o_proj bias
  olmoe      as qwen3_moe, but q/k RMSNorm over the whole q / k projection
             (qk_norm='full', required), which needs head_dim =
             d_model / num_heads (OLMoE's q_norm is hidden_size wide)
  glm4_moe   the sigmoid + bias + shared family: `deepseek_v3` (selection
             bias -> mlp.gate.e_score_correction_bias from 'router_state',
             n_group, topk_group, routed_scaling_factor, norm_topk_prob) and
             `sigmoid` (zero bias, n_group = topk_group = 1, scaling 1;
             renormalised or not: Glm4MoeTopkRouter's norm_topk_prob=false
             weights are the bare σ(z) of the top k, which is our
             un-renormalised sigmoid exactly). GQA with q/k/v biases and no
             o_proj bias, optional per-head q/k norm (use_qk_norm), partial
             RoPE (partial_rotary_factor = rope_fraction). Shared experts
             are ungated: one MLP `mlp.shared_experts.*` of width
             n_shared_experts · moe_intermediate_size, our mix 'add' as is;
             'half' (upcycled) is 0.5 (routed + shared) while Glm4Moe adds
             them, so both the routed and the shared down projections are
             halved. No shared expert: n_shared_experts = 0 and empty
             shared tensors, as save_pretrained writes them.

A router or layout the chosen class cannot hold exactly is refused, naming
the classes that can hold the router. So is what no class holds: a router
bias (router_init='torch_default'), a capacity factor (the classes are
dropless), DropTop and LibMoE parity flags. The directory is written whole
or not at all (a temporary directory renamed at the end).

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

TARGETS = ('dense', 'phi3', 'mixtral', 'qwen2_moe', 'qwen3_moe', 'olmoe',
           'glm4_moe')
# Dense targets: 'dense' picks Llama / Qwen2 / Qwen3 by the attention;
# 'phi3' writes Phi-3's fused qkv_proj and gate_up_proj.
DENSE_TARGETS = ('dense', 'phi3')
# Classes whose sliding_window covers every layer, as TransformerLM's does.
WINDOWED_TARGETS = ('phi3', 'mixtral')
# MoE target -> (model_type, architecture, name in messages).
MOE_CLASSES = {
    'mixtral': ('mixtral', 'MixtralForCausalLM', 'Mixtral'),
    'qwen2_moe': ('qwen2_moe', 'Qwen2MoeForCausalLM', 'Qwen2-MoE'),
    'qwen3_moe': ('qwen3_moe', 'Qwen3MoeForCausalLM', 'Qwen3-MoE'),
    'olmoe': ('olmoe', 'OlmoeForCausalLM', 'OLMoE'),
    'glm4_moe': ('glm4_moe', 'Glm4MoeForCausalLM', 'Glm4Moe'),
}
# moe_jax router -> the stock HF classes that hold it exactly (§5.1).
HOLDERS = {
    'smoe': ('mixtral', 'qwen2_moe', 'qwen3_moe', 'olmoe'),
    'deepseek_v2': ('qwen2_moe', 'qwen3_moe and olmoe (without a shared '
                    'expert)'),
    'sigmoid': ('glm4_moe (zero bias, renormalised or not)',),
    'deepseek_v3': ('glm4_moe',),
}
# transformers 5 writes a chat template to chat_template.jinja (4.x kept
# it in tokenizer_config.json); added_tokens.json holds slow tokenizers'
# added tokens.
TOKENIZER_FILES = ('tokenizer.json', 'tokenizer_config.json',
                   'special_tokens_map.json', 'tokenizer.model',
                   'chat_template.jinja', 'added_tokens.json')
# Attention biases each projection has under our attention_bias.
_BIASED = {'none': (), 'qkv': ('q', 'k', 'v'), 'all': ('q', 'k', 'v', 'o')}


def copy_tokenizer_files(tokenizer_dir: str | None, out_dir: str) -> None:
  """Copies the HF tokenizer files `tokenizer_dir` has into `out_dir`."""
  for name in TOKENIZER_FILES:
    if tokenizer_dir and os.path.isfile(os.path.join(tokenizer_dir, name)):
      shutil.copy2(os.path.join(tokenizer_dir, name), out_dir)


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
  if router is None:                       # a dense model: no router hint
    raise ExportError(f'--to={target}: {what}')
  holders = HOLDERS.get(router or '', ())
  hint = (f'classes that hold router {router!r}: {", ".join(holders)}'
          if holders else f'no stock Hugging Face class holds router '
          f'{router!r} exactly; it needs a trust_remote_code export')
  raise ExportError(f'--to={target}: {what}; {hint}')


def _rotated_dims(kwargs: Mapping[str, Any]) -> tuple[int, int]:
  """(moe_jax's rotated dims per head, Glm4Moe's int(Dh · factor))."""
  dh, fraction = kwargs['head_dim'], kwargs.get('rope_fraction', 0.5)
  return 2 * int(dh * fraction // 2), int(dh * fraction)


def _shared_width(ffn: Mapping[str, Any]) -> int:
  """Width of the merged shared MLP (0 without shared experts)."""
  return ffn.get('shared_experts', 0) * (ffn.get('shared_width') or
                                         ffn['expert_width'])


def _check_routing(kwargs: Mapping[str, Any], target: str, refuse) -> None:
  """The router, its options and the shared experts of an MoE target."""
  ffn = kwargs['ffn']
  router = ffn['router']
  options = dict(ffn.get('router_options') or {})
  shared = ffn.get('shared_experts', 0)
  name = MOE_CLASSES[target][2]
  if target == 'mixtral':
    refuse(router == 'smoe' and options.get('normalize_topk', True),
           'Mixtral routes softmax top-k, renormalised')
    refuse(not shared, 'Mixtral has no shared expert')
  elif target == 'qwen2_moe':
    refuse(router in ('smoe', 'deepseek_v2'),
           'Qwen2-MoE routes softmax top-k')
    # Its one shared MLP of width shared_expert_intermediate_size holds our
    # n shared experts merged into one of width n x w (under one gate).
  elif target in ('qwen3_moe', 'olmoe'):
    refuse(router in ('smoe', 'deepseek_v2'), f'{name} routes softmax top-k')
    refuse(not shared, f'{name} has no shared expert')
  else:
    refuse(router in ('sigmoid', 'deepseek_v3'), 'Glm4Moe routes sigmoid '
           'top-k with a selection bias (DeepSeek-V3)')
    # Its router sums each group's top-2 scores, even with one group.
    refuse(ffn['num_experts'] >= 2, 'Glm4Moe routes over >= 2 experts')
    refuse(not shared or ffn.get('shared_mix', 'add') in ('add', 'half'),
           "Glm4Moe's shared experts are ungated (shared_mix 'add' or "
           "'half', not 'sigmoid_gate')")
    refuse(_shared_width(ffn) % ffn['expert_width'] == 0,
           f'Glm4Moe shared experts are n_shared_experts x '
           f"moe_intermediate_size={ffn['expert_width']} wide, the model's "
           f'{_shared_width(ffn)}')


def _check_attention(kwargs: Mapping[str, Any], target: str, refuse) -> None:
  """Biases, q/k norms and RoPE of an MoE target."""
  bias = kwargs.get('attention_bias', 'none')
  qk_norm = kwargs.get('qk_norm', 'none')
  if target == 'mixtral':
    refuse(bias == 'none', 'Mixtral attention has no biases')
  elif target in ('qwen2_moe', 'glm4_moe'):
    refuse(bias in ('none', 'qkv'), f'{MOE_CLASSES[target][2]} has q/k/v '
           'biases and no output bias')
  if target in ('mixtral', 'qwen2_moe'):
    refuse(qk_norm == 'none', 'q/k norms have no key in this class')
  elif target == 'qwen3_moe':
    # A norm with unit scale still normalises: it cannot be filled in.
    refuse(qk_norm == 'per_head', 'Qwen3-MoE normalises q and k per head '
           f'(qk_norm=per_head), the model has qk_norm={qk_norm}')
  elif target == 'olmoe':
    refuse(qk_norm == 'full', 'OLMoE normalises q and k over the whole '
           f'projection (qk_norm=full), the model has qk_norm={qk_norm}')
    refuse(kwargs['head_dim'] * kwargs['num_heads'] == kwargs['d_model'],
           f"OLMoE's q_norm is hidden_size={kwargs['d_model']} wide, the "
           f"model's q is num_heads x head_dim = {kwargs['num_heads']} x "
           f"{kwargs['head_dim']}")
  else:
    refuse(qk_norm in ('none', 'per_head'), 'Glm4Moe normalises q and k per '
           'head (use_qk_norm) or not at all')
  if target == 'glm4_moe':
    ours, theirs = _rotated_dims(kwargs)
    refuse(0 < kwargs.get('rope_fraction', 0.5) <= 1 and ours == theirs,
           f'Glm4Moe rotates int(head_dim x partial_rotary_factor) = {theirs}'
           f' dims per head, the model {ours}')
  else:
    refuse(kwargs.get('rope_fraction') == 1.0,
           f"RoPE rotates a fraction {kwargs.get('rope_fraction')} of each "
           'head; Llama-family targets rotate all of it')


def _check_phi3_rope(kwargs: Mapping[str, Any], refuse) -> None:
  """Refuses the RoPE a Phi3ForCausalLM cannot compute as the model does.

  Phi-3 takes rope_scaling only as longrope (which moe_jax lacks), and
  rotates int(Dh · f) dims rounded up to even (moe_jax: down), so only an
  even rotated width agrees.
  """
  scaling = kwargs.get('rope_scaling') or {}
  kind = scaling.get('rope_type', scaling.get('type', 'default'))
  refuse(kind == 'default',
         f'rope_scaling of rope_type {kind!r}: Phi-3 accepts rope_scaling '
         "None (rope_type 'default') or 'longrope', which moe_jax does not "
         'implement; use --to=dense for linear / llama3 / yarn')
  ours, theirs = _rotated_dims(dict(kwargs, rope_fraction=kwargs.get(
      'rope_fraction', 1.0)))
  refuse(ours == theirs,
         f"Phi-3 rotates int(head_dim x partial_rotary_factor) = {theirs} "
         f'dims per head (an odd width), the model {ours}')


def check_exportable(kwargs: Mapping[str, Any], target: str) -> None:
  """Raises ExportError naming what `target` cannot hold."""
  if target not in TARGETS:
    raise ExportError(f'--to: expected one of {TARGETS}, got {target!r}')
  ffn = kwargs['ffn']
  router = None if kwargs.get('dense_ffn') else ffn['router']
  refuse = lambda ok, what: _refuse(ok, what, target, router)
  refuse(kwargs.get('norm') == 'rmsnorm', 'the model uses LayerNorm '
         '(LibMoE LM stack), every target uses RMSNorm')
  refuse(kwargs.get('kv_projection') == 'separate' and
         not kwargs.get('output_bias', True),
         "LibMoE's fused K/V projection or output bias has no HF key")
  refuse(ffn.get('activation') == 'swiglu' and
         not ffn.get('use_bias', ffn.get('expert_bias', False)),
         'only bias-free SwiGLU MLPs / experts have HF keys here')
  refuse(not kwargs.get('sliding_window') or target in WINDOWED_TARGETS,
         f"sliding_window={kwargs.get('sliding_window')}: of the targets "
         f'only {WINDOWED_TARGETS} window every layer')
  if target == 'phi3':
    refuse(bool(kwargs.get('dense_ffn')), 'an MoE model needs an MoE '
           'target')
    refuse(kwargs.get('attention_bias', 'none') == 'none' and
           kwargs.get('qk_norm', 'none') == 'none',
           'Phi-3 attention has no biases and no q/k norm')
    _check_phi3_rope(kwargs, refuse)
    return
  if target == 'dense':
    refuse(kwargs.get('rope_fraction') == 1.0,
           f"RoPE rotates a fraction {kwargs.get('rope_fraction')} of each "
           'head; Llama-family targets rotate all of it')
    refuse(bool(kwargs.get('dense_ffn')), 'an MoE model needs an MoE '
           'target')
    refuse(kwargs.get('qk_norm', 'none') in ('none', 'per_head'),
           f"qk_norm={kwargs.get('qk_norm')!r} (q/k RMSNorm over the whole "
           "projection) has no dense class; Qwen3 holds qk_norm='per_head', "
           "Llama and Qwen2 'none'")
    return
  refuse(not kwargs.get('dense_ffn'), 'a dense model has no experts; use '
         '--to=dense')
  options = dict(ffn.get('router_options') or {})
  refuse(not options.get('drop_top') and
         not any((options.get('parity') or {}).values()),
         'DropTop and LibMoE parity flags change the routing')
  refuse(options.get('router_init', 'normal') != 'torch_default',
         "router_init='torch_default' gives the router a bias, which no "
         'class has')
  refuse(ffn.get('capacity_factor') is None, 'a capacity factor drops '
         'tokens; the Hugging Face classes are dropless')
  # The router first: its refusal names the classes that can hold it.
  _check_routing(kwargs, target, refuse)
  _check_attention(kwargs, target, refuse)


def _rope_fields(kwargs: Mapping[str, Any],
                 partial: bool = False) -> dict[str, Any]:
  scaling = dict(kwargs.get('rope_scaling') or {})
  params = {'rope_theta': kwargs.get('rope_theta', 10000.0),
            'rope_type': scaling.get('rope_type', 'default'), **scaling}
  out = {}
  if partial:
    # Glm4Moe reads it from rope_parameters; older code from the top level.
    params['partial_rotary_factor'] = float(kwargs.get('rope_fraction', 0.5))
    out['partial_rotary_factor'] = params['partial_rotary_factor']
  return {**out, 'rope_parameters': params,
          'rope_theta': params['rope_theta'], 'rope_scaling': scaling or None}


def _common_config(kwargs: Mapping[str, Any], extra: Mapping[str, Any],
                   partial_rope: bool = False) -> dict[str, Any]:
  config = {
      'vocab_size': kwargs['vocab_size'], 'hidden_size': kwargs['d_model'],
      'num_hidden_layers': kwargs['num_layers'],
      'num_attention_heads': kwargs['num_heads'],
      'num_key_value_heads': kwargs.get('num_kv_heads') or kwargs['num_heads'],
      'head_dim': kwargs['head_dim'], 'hidden_act': 'silu',
      'rms_norm_eps': kwargs.get('norm_eps', 1e-6),
      'tie_word_embeddings': bool(kwargs.get('tie_embeddings')),
      'max_position_embeddings': 4096, 'initializer_range': 0.02,
      'use_cache': True, 'dtype': 'float32',
      **_rope_fields(kwargs, partial_rope)}
  config.update(extra)
  return config


def dense_architecture(kwargs: Mapping[str, Any]) -> tuple[str, str]:
  """(model_type, architecture) of a dense model by its attention."""
  if kwargs.get('qk_norm') == 'per_head':
    return 'qwen3', 'Qwen3ForCausalLM'
  if kwargs.get('attention_bias') == 'qkv':
    return 'qwen2', 'Qwen2ForCausalLM'
  return 'llama', 'LlamaForCausalLM'


def _glm4_routing(ffn: Mapping[str, Any]) -> dict[str, Any]:
  """Glm4Moe router fields: the deepseek_v3 options, or sigmoid's."""
  options = dict(ffn.get('router_options') or {})
  v3 = ffn['router'] == 'deepseek_v3'
  n_group = int(options.get('n_group', 1)) if v3 else 1
  return dict(
      n_group=max(n_group, 1),
      # One group: every expert is kept, whatever topk_group says.
      topk_group=int(options.get('topk_group', 1)) if n_group > 1 else 1,
      routed_scaling_factor=(float(options.get('routed_scaling_factor', 1.0))
                             if v3 else 1.0),
      norm_topk_prob=bool(options.get('normalize_topk', True)))


def hf_config(kwargs: Mapping[str, Any], target: str,
              base: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """config.json of the export; `base` carries fields such as token ids."""
  extra = {k: v for k, v in (base or {}).items()
           if k in ('bos_token_id', 'eos_token_id', 'pad_token_id',
                    'max_position_embeddings')}
  ffn = kwargs['ffn']
  if target == 'phi3':
    extra.update(intermediate_size=ffn['width'],
                 partial_rotary_factor=kwargs.get('rope_fraction', 1.0),
                 sliding_window=kwargs.get('sliding_window'))
    extra.setdefault('pad_token_id', None)
    config = _common_config(kwargs, dict(extra, model_type='phi3',
                                         architectures=['Phi3ForCausalLM']))
    config['rope_parameters']['partial_rotary_factor'] = kwargs.get(
        'rope_fraction', 1.0)
    return config
  if target == 'dense':
    model_type, arch = dense_architecture(kwargs)
    extra.update(intermediate_size=ffn['width'])
    if model_type == 'llama':
      extra.update(attention_bias=kwargs.get('attention_bias') == 'all',
                   mlp_bias=False)
    if model_type == 'qwen3':
      # One flag for q/k/v and o biases (a zero o_proj bias fills 'qkv').
      extra.update(attention_bias=kwargs.get('attention_bias',
                                             'none') != 'none')
    return _common_config(kwargs, dict(extra, model_type=model_type,
                                       architectures=[arch]))
  model_type, arch, _ = MOE_CLASSES[target]
  options = dict(ffn.get('router_options') or {})
  norm_topk = bool(options.get('normalize_topk', True))
  # Qwen3-MoE / OLMoE: one flag for q/k/v and o biases (zeros fill the gap).
  any_bias = kwargs.get('attention_bias', 'none') != 'none'
  experts = dict(num_experts=ffn['num_experts'],
                 num_experts_per_tok=ffn['top_k'], output_router_logits=False)
  if target == 'mixtral':
    extra.update(num_local_experts=ffn['num_experts'],
                 num_experts_per_tok=ffn['top_k'],
                 intermediate_size=ffn['expert_width'],
                 router_jitter_noise=0.0,
                 sliding_window=kwargs.get('sliding_window'),
                 output_router_logits=False)
  elif target == 'qwen2_moe':
    shared = ffn.get('shared_width') or ffn['expert_width']
    extra.update(experts, moe_intermediate_size=ffn['expert_width'],
                 intermediate_size=ffn['expert_width'],
                 shared_expert_intermediate_size=(
                     shared * max(ffn.get('shared_experts', 0), 1)),
                 norm_topk_prob=norm_topk, decoder_sparse_step=1,
                 mlp_only_layers=[], use_sliding_window=False)
  elif target == 'qwen3_moe':
    extra.update(experts, moe_intermediate_size=ffn['expert_width'],
                 intermediate_size=ffn['expert_width'],
                 norm_topk_prob=norm_topk, decoder_sparse_step=1,
                 mlp_only_layers=[], use_sliding_window=False,
                 sliding_window=None, attention_bias=any_bias)
  elif target == 'olmoe':
    # OlmoeConfig's token-id defaults are OLMoE's tokenizer's (eos 50279):
    # without a base config the model has none.
    for key in ('bos_token_id', 'eos_token_id', 'pad_token_id'):
      extra.setdefault(key, None)
    extra.update(experts, intermediate_size=ffn['expert_width'],
                 norm_topk_prob=norm_topk, attention_bias=any_bias,
                 clip_qkv=None)
  else:
    extra.update(
        n_routed_experts=ffn['num_experts'], num_experts_per_tok=ffn['top_k'],
        moe_intermediate_size=ffn['expert_width'],
        # The dense-MLP width of first_k_dense_replace layers (there are
        # none).
        intermediate_size=ffn['expert_width'],
        n_shared_experts=_shared_width(ffn) // ffn['expert_width'],
        first_k_dense_replace=0, **_glm4_routing(ffn),
        use_qk_norm=kwargs.get('qk_norm', 'none') == 'per_head',
        attention_bias=kwargs.get('attention_bias', 'none') == 'qkv',
        num_nextn_predict_layers=0, output_router_logits=False)
  return _common_config(kwargs, dict(extra, model_type=model_type,
                                     architectures=[arch]),
                        partial_rope=target == 'glm4_moe')


def _zero_biases(kwargs: Mapping[str, Any], target: str) -> tuple[str, ...]:
  """Projections whose bias the class has and the model lacks (zeros)."""
  bias = kwargs.get('attention_bias', 'none')
  qwen3 = (target == 'dense' and
           dense_architecture(kwargs)[0] == 'qwen3')
  if target == 'qwen2_moe':
    want = _BIASED['qkv']
  elif (target in ('qwen3_moe', 'olmoe') or qwen3) and bias != 'none':
    want = _BIASED['all']
  else:
    want = _BIASED[bias]
  return tuple(n for n in want if n not in _BIASED[bias])


def _attention(pre: str, att: Mapping,
               zero_bias: tuple[str, ...]) -> dict[str, np.ndarray]:
  out = {}
  for flax_name, name in (('query', 'q'), ('key', 'k'), ('value', 'v'),
                          ('out', 'o')):
    out[f'{pre}self_attn.{name}_proj.weight'] = _torch(att[flax_name]['kernel'])
    if 'bias' in att[flax_name]:
      out[f'{pre}self_attn.{name}_proj.bias'] = _np(att[flax_name]['bias'])
    elif name in zero_bias:
      width = np.shape(att[flax_name]['kernel'])[1]
      out[f'{pre}self_attn.{name}_proj.bias'] = np.zeros((width,), np.float32)
  # Per head (Dh,) or over the whole projection (H·Dh,), (K·Dh,) (OLMoE).
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


def _qwen2_shared(mlp: str, moe: Mapping, ffn: Mapping[str, Any], d: int,
                  half: bool) -> dict[str, np.ndarray]:
  """Qwen2-MoE's shared expert and its gate: out += σ(x g) shared(x)."""
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
  return {f'{mlp}shared_expert.gate_proj.weight': gate,
          f'{mlp}shared_expert.up_proj.weight': up,
          f'{mlp}shared_expert.down_proj.weight': down,
          f'{mlp}shared_expert_gate.weight': gate_w}


def _glm4_shared(mlp: str, moe: Mapping, ffn: Mapping[str, Any], d: int,
                 half: bool) -> dict[str, np.ndarray]:
  """Glm4Moe's ungated shared MLP (n_shared · I wide; empty without one)."""
  if ffn.get('shared_experts'):
    gate, up, down = _swiglu(moe['shared']['w_in'], moe['shared']['w_out'])
    if half:
      down = down * 0.5
  else:
    gate, up = np.zeros((0, d), np.float32), np.zeros((0, d), np.float32)
    down = np.zeros((d, 0), np.float32)
  return {f'{mlp}shared_experts.gate_proj.weight': gate,
          f'{mlp}shared_experts.up_proj.weight': up,
          f'{mlp}shared_experts.down_proj.weight': down}


def _selection_bias(ffn: Mapping[str, Any], layer_state,
                    layer: str) -> np.ndarray:
  """e_score_correction_bias [E]: deepseek_v3's state, zero for sigmoid."""
  if ffn['router'] != 'deepseek_v3':
    return np.zeros((ffn['num_experts'],), np.float32)
  try:
    bias = layer_state['moe']['router']['router']['bias']
  except (KeyError, TypeError):
    raise ExportError(f"router_state has no {layer}/moe/router/router/bias: "
                      'the deepseek_v3 selection bias is exported as '
                      'e_score_correction_bias (pass the run\'s '
                      "'router_state' collection)") from None
  return _np(bias)


def _layer_ffn(pre: str, layer: Mapping, kwargs: Mapping[str, Any],
               target: str, layer_state=None,
               name: str = '') -> dict[str, np.ndarray]:
  if target == 'dense':
    gate, up, down = _swiglu(layer['ffn']['ffn']['w_in'],
                             layer['ffn']['ffn']['w_out'])
    return {f'{pre}mlp.gate_proj.weight': gate,
            f'{pre}mlp.up_proj.weight': up, f'{pre}mlp.down_proj.weight': down}
  ffn, moe = kwargs['ffn'], layer['moe']
  mixtral = target == 'mixtral'
  mlp = pre + ('block_sparse_moe.' if mixtral else 'mlp.')
  names = (('w1', 'w3', 'w2') if mixtral else
           ('gate_proj', 'up_proj', 'down_proj'))
  # 'half' is 0.5 (routed + shared) and the classes add the two: the 0.5
  # goes into the down projections (Qwen2-MoE's gate carries the shared
  # one).
  half = bool(ffn.get('shared_mix') == 'half' and ffn.get('shared_experts'))
  out = {mlp + 'gate.weight': _torch(moe['router']['router']['w'])}  # [E, D]
  if target == 'glm4_moe':
    out[mlp + 'gate.e_score_correction_bias'] = _selection_bias(
        ffn, layer_state, name)
  experts_in, experts_out = moe['experts']['w_in'], moe['experts']['w_out']
  for e in range(ffn['num_experts']):
    gate, up, down = _swiglu(experts_in[e], experts_out[e])
    base = f'{mlp}experts.{e}.'
    out.update({base + names[0] + '.weight': gate,
                base + names[1] + '.weight': up,
                base + names[2] + '.weight': down * 0.5 if half else down})
  if target == 'qwen2_moe':
    out.update(_qwen2_shared(mlp, moe, ffn, kwargs['d_model'], half))
  elif target == 'glm4_moe':
    out.update(_glm4_shared(mlp, moe, ffn, kwargs['d_model'], half))
  return out


def hf_tensors(kwargs: Mapping[str, Any], params: Mapping, target: str,
               router_state: Mapping | None = None):
  """Yields (HF key, torch-layout array), one layer at a time."""
  zero_bias = _zero_biases(kwargs, target)
  yield 'model.embed_tokens.weight', _np(params['embedding'])
  for i in range(kwargs['num_layers']):
    name, pre = f'layer_{i}', f'model.layers.{i}.'
    layer = params[name]
    tensors = {f'{pre}input_layernorm.weight': _np(layer['ln1']['scale']),
               f'{pre}post_attention_layernorm.weight':
                   _np(layer['ln2']['scale'])}
    tensors.update(_attention(pre, layer['attention'], zero_bias))
    tensors.update(_layer_ffn(pre, layer, kwargs,
                              'dense' if target == 'phi3' else target,
                              (router_state or {}).get(name), name))
    if target == 'phi3':
      tensors = _fuse_phi3(pre, tensors)
    yield from tensors.items()
  yield 'model.norm.weight', _np(params['ln_final']['scale'])
  if not kwargs.get('tie_embeddings'):
    yield 'lm_head.weight', _torch(params['output']['kernel'])


def _fuse_phi3(pre: str, tensors: dict[str, np.ndarray]
               ) -> dict[str, np.ndarray]:
  """Phi-3's layout: q/k/v rows stacked in qkv_proj, gate then up rows in
  gate_up_proj (the split that families.py undoes on import)."""
  out = dict(tensors)
  att = f'{pre}self_attn.'
  out[att + 'qkv_proj.weight'] = np.concatenate(
      [out.pop(att + f'{n}_proj.weight') for n in ('q', 'k', 'v')], axis=0)
  mlp = f'{pre}mlp.'
  out[mlp + 'gate_up_proj.weight'] = np.concatenate(
      [out.pop(mlp + 'gate_proj.weight'), out.pop(mlp + 'up_proj.weight')],
      axis=0)
  return out


def _check_router_state(kwargs: Mapping[str, Any], router_state,
                        target: str) -> None:
  """Router state other than Glm4Moe's selection bias has no key."""
  ffn = kwargs['ffn']
  if target == 'glm4_moe':
    if ffn['router'] == 'deepseek_v3':
      for i in range(kwargs['num_layers']):
        bias = _selection_bias(ffn, (router_state or {}).get(f'layer_{i}'),
                               f'layer_{i}')
        if bias.shape != (ffn['num_experts'],):
          raise ExportError(f'layer_{i} selection bias has shape '
                            f"{bias.shape}, expected ({ffn['num_experts']},)")
    return
  if router_state and any(np.any(np.asarray(v) != 0) for v in
                          _leaves(router_state)):
    _refuse(False, 'the router state (a learnt selection bias) has no key '
            'in this class', target, ffn.get('router'))


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
  """Writes the HF directory `out_dir` (must not exist); returns it.

  Args:
    kwargs: TransformerLM keyword arguments of the model.
    params: its 'params' collection.
    router_state: its 'router_state' collection ({} when the router keeps
      none); glm4_moe writes a deepseek_v3 router's selection bias from it.
    to: one of TARGETS.
    out_dir: the directory to create.
    tokenizer_dir: a directory whose tokenizer files are copied, or None.
    base_config: config.json fields carried over (token ids, context).
    max_shard_bytes: the most tensor bytes per safetensors shard.
    progress: show a progress bar.
  """
  check_exportable(kwargs, to)
  if not kwargs.get('dense_ffn'):
    _check_router_state(kwargs, router_state, to)
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
                                         'pad_token_id')
                  if config.get(k) is not None}
    with open(os.path.join(staging, 'generation_config.json'), 'w') as f:
      json.dump({'_from_model_config': True, **generation}, f, indent=2)
    writer = safetensors_io.ShardedWriter(staging,
                                          max_shard_bytes=max_shard_bytes)
    with writer:
      for key, array in tqdm(hf_tensors(kwargs, params, to, router_state),
                             desc='export', unit='tensor',
                             disable=not progress):
        writer.add(key, array)
    copy_tokenizer_files(tokenizer_dir, staging)
    os.replace(staging, out_dir)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
  return out_dir
