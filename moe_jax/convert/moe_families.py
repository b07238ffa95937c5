"""Hugging Face MoE decoder families: config and key tables (formats.md §4-5).

As families.py does for the dense families, `model_kwargs(hf, family)` gives
the TransformerLM keyword arguments of an HF `config.json` (dense_ffn=False,
`ffn` = MoEBlock kwargs), `key_table(hf, family, layout)` the `Entry` list
of the trainable parameters and `state_table(hf, family)` that of
the 'router_state' collection (the DeepSeek-V3 selection bias). Routed
experts are read from either layout (formats.md §4.2-4.3):

  'per_expert' (legacy, what save_pretrained writes by default):
      Mixtral  block_sparse_moe.experts.{e}.w1 / w3 (I, D), w2 (D, I)
      others   mlp.experts.{e}.gate_proj / up_proj (I, D), down_proj (D, I)
  'fused' (transformers 5 in memory; save_original_format=False):
      mlp.experts.gate_up_proj (E, 2I, D), gate rows first, and
      mlp.experts.down_proj (E, D, I); Mixtral's router is then mlp.gate.

Both become the MoEBlock's experts w_in [E, D, 2I] = [gate | up] (SwiGLU)
and w_out [E, I, D]; the router weight (E, D) becomes `w` [D, E].

Families:
  mixtral    `smoe`: softmax over E, top-k, renormalised. Training-time
             router_jitter_noise is not reproduced (inference is exact).
  qwen2_moe  `smoe` renormalised iff norm_topk_prob; q/k/v biases (qkv_bias);
             one shared expert with a sigmoid gate, out += σ(x w_g) f_s(x)
             (MoEBlock shared_mix='sigmoid_gate').
  qwen3_moe  as qwen2_moe without the shared expert, with per-head q/k
             RMSNorm (and o_proj bias too when attention_bias).
  olmoe      `smoe` renormalised iff norm_topk_prob; q/k RMSNorm over the
             whole q / k projection (OlmoeAttention: q_norm(q_proj(x)) of
             width H·Dh, k_norm of width K·Dh, before the head split), i.e.
             decoder qk_norm='full'. clip_qkv is refused.
  glm4_moe   `deepseek_v3`: s = σ(z); selection on s + e_score_correction_bias
             (kept in 'router_state'), group-limited over n_group groups
             (top-2 sum, top `topk_group` groups kept, the rest masked with
             -inf as Glm4MoeTopkRouter does, our default); weights are the
             unbiased s, renormalised, × routed_scaling_factor; plus
             n_shared_experts ungated shared experts stored as one MLP of
             width n_shared·I (shared_mix='add').

Why Glm4Moe is the sigmoid + bias + shared family: its attention is exactly
our decoder's. DeepSeek-V3 uses MLA (low-rank compressed q/kv, a decoupled
RoPE key), which the decoder lacks. Glm4MoeAttention is GQA with q/k/v
biases iff attention_bias and none on o_proj (attention_bias='qkv'),
optional per-head q/k RMSNorm before RoPE (use_qk_norm; qk_norm='per_head'),
and partial RoPE (partial_rotary_factor, 0.5 when absent) applied
rotate-half to the FIRST int(Dh·factor) dims of each head with the rest
passed through: models/rope.apply_rope's layout, not an interleaved one.
dots1 would fit too (Qwen3 attention, full rotary) but only glm4_moe is
tested here.

Refused, each with an error naming the config field: mixed dense / MoE
stacks (first_k_dense_replace > 0, decoder_sparse_step != 1, a non-empty
mlp_only_layers), sliding-window attention narrower than the context,
clip_qkv and a hidden_act other than silu.

Dimension legend: V vocabulary, D model width, H heads, K kv heads, Dh head
width, E routed experts, I expert width, L layers.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np

from moe_jax.convert import families

# architectures[0] of config.json -> family.
ARCHITECTURES = {
    'MixtralForCausalLM': 'mixtral',
    'Qwen2MoeForCausalLM': 'qwen2_moe',
    'Qwen3MoeForCausalLM': 'qwen3_moe',
    'OlmoeForCausalLM': 'olmoe',
    'Glm4MoeForCausalLM': 'glm4_moe',
}

LAYOUTS = ('per_expert', 'fused')


def family_of(hf: Mapping[str, Any]) -> str | None:
  """The MoE family of an HF config, or None if it is not one."""
  archs = hf.get('architectures') or []
  return ARCHITECTURES.get(archs[0]) if archs else None


def layout_of(keys) -> str:
  """'fused' if the checkpoint holds 3D mlp.experts.gate_up_proj tensors."""
  fused = any(k.endswith('.mlp.experts.gate_up_proj') for k in keys)
  return 'fused' if fused else 'per_expert'


def _refuse(field: str, value: Any, why: str) -> None:
  raise ValueError(f'config.json {field}={value!r}: {why}')


def dims(hf: Mapping[str, Any], family: str) -> dict[str, int]:
  heads = hf['num_attention_heads']
  if family == 'glm4_moe':
    experts = hf.get('n_routed_experts', hf.get('num_local_experts'))
  elif family == 'mixtral':
    experts = hf.get('num_local_experts', hf.get('num_experts'))
  else:
    experts = hf.get('num_experts', hf.get('num_local_experts'))
  width_key = ('intermediate_size' if family in ('mixtral', 'olmoe') else
               'moe_intermediate_size')
  return {'V': hf['vocab_size'], 'D': hf['hidden_size'], 'H': heads,
          'K': hf.get('num_key_value_heads') or heads,
          'Dh': hf.get('head_dim') or hf['hidden_size'] // heads,
          'E': experts, 'I': hf[width_key], 'L': hf['num_hidden_layers']}


def _check_supported(hf: Mapping[str, Any], family: str) -> None:
  """Refuses what the decoder / MoEBlock cannot compute exactly."""
  if hf.get('hidden_act', 'silu') != 'silu':
    _refuse('hidden_act', hf['hidden_act'],
            f"the {family} experts are SwiGLU ('silu')")
  window = hf.get('sliding_window')
  if family in ('qwen2_moe', 'qwen3_moe'):
    # The Qwen MoE configs keep a sliding_window value that only takes
    # effect with use_sliding_window.
    window = window if hf.get('use_sliding_window') else None
  if window and window < hf.get('max_position_embeddings', 0):
    _refuse('sliding_window', window,
            f"narrower than max_position_embeddings="
            f"{hf['max_position_embeddings']}: sliding-window attention is "
            'not implemented')
  if family == 'olmoe' and hf.get('clip_qkv') is not None:
    _refuse('clip_qkv', hf['clip_qkv'], 'clipping q/k/v is not implemented')
  if family in ('qwen2_moe', 'qwen3_moe'):
    if hf.get('decoder_sparse_step', 1) != 1:
      _refuse('decoder_sparse_step', hf['decoder_sparse_step'],
              'mixed dense / MoE stacks are not supported (need 1)')
    if hf.get('mlp_only_layers'):
      _refuse('mlp_only_layers', hf['mlp_only_layers'],
              'mixed dense / MoE stacks are not supported (need [])')
  if family == 'glm4_moe':
    if hf.get('first_k_dense_replace', 1) != 0:
      _refuse('first_k_dense_replace', hf.get('first_k_dense_replace', 1),
              'mixed dense / MoE stacks are not supported (need 0)')
  if not dims(hf, family)['E']:
    _refuse('num_experts', dims(hf, family)['E'],
            'a model without routed experts is dense')


def _router(hf: Mapping[str, Any], family: str) -> tuple[str, dict]:
  """(router name, router_options) of the family's router."""
  if family == 'mixtral':
    return 'smoe', {'normalize_topk': True}
  if family == 'glm4_moe':
    return 'deepseek_v3', {
        'n_group': int(hf.get('n_group') or 1),
        'topk_group': int(hf.get('topk_group') or 1),
        'routed_scaling_factor': float(hf.get('routed_scaling_factor', 1.0)),
        'normalize_topk': bool(hf.get('norm_topk_prob', True)),
        # An imported model keeps its bias fixed until a run sets a rate.
        'bias_update_rate': 0.0}
  return 'smoe', {'normalize_topk': bool(hf.get('norm_topk_prob', False))}


def _shared(hf: Mapping[str, Any], family: str) -> tuple[int, int | None,
                                                         str]:
  """(shared_experts, shared_width, shared_mix)."""
  if family == 'qwen2_moe':
    width = hf.get('shared_expert_intermediate_size') or 0
    return (1, width, 'sigmoid_gate') if width else (0, None, 'add')
  if family == 'glm4_moe':
    n = int(hf.get('n_shared_experts') or 0)
    return (n, hf['moe_intermediate_size'], 'add') if n else (0, None, 'add')
  return 0, None, 'add'


def _attention(hf: Mapping[str, Any], family: str) -> tuple[str, str]:
  """(attention_bias, qk_norm) of the decoder."""
  if family == 'qwen2_moe':
    bias = 'qkv' if hf.get('qkv_bias', True) else 'none'
  elif family == 'glm4_moe':
    bias = 'qkv' if hf.get('attention_bias') else 'none'  # no o_proj bias
  else:
    bias = 'all' if hf.get('attention_bias') else 'none'
  qk_norm = {'qwen3_moe': 'per_head', 'olmoe': 'full',
             'glm4_moe': 'per_head' if hf.get('use_qk_norm') else 'none'
             }.get(family, 'none')
  return bias, qk_norm


def model_kwargs(hf: Mapping[str, Any], family: str, *,
                 backend: str = 'blocked') -> dict[str, Any]:
  """TransformerLM keyword arguments (an MoEBlock in every layer)."""
  _check_supported(hf, family)
  d = dims(hf, family)
  router, router_options = _router(hf, family)
  shared, shared_width, shared_mix = _shared(hf, family)
  bias, qk_norm = _attention(hf, family)
  rope = families._rope(hf)  # pylint: disable=protected-access
  if family == 'glm4_moe' and 'partial_rotary_factor' not in {
      **hf, **(hf.get('rope_parameters') or {})}:
    rope['rope_fraction'] = 0.5            # Glm4MoeConfig's default
    families.check_rotary(hf, 0.5)
  return dict(
      vocab_size=d['V'], d_model=d['D'], num_layers=d['L'],
      num_heads=d['H'], head_dim=d['Dh'], num_kv_heads=d['K'],
      dense_ffn=False,
      ffn=dict(d_model=d['D'], num_experts=d['E'],
               top_k=hf['num_experts_per_tok'], expert_width=d['I'],
               router=router, router_options=router_options,
               activation='swiglu', expert_bias=False, backend=backend,
               shared_experts=shared, shared_width=shared_width,
               shared_mix=shared_mix, losses=None),
      norm='rmsnorm', norm_eps=float(hf.get('rms_norm_eps', 1e-6)),
      attention_bias=bias, qk_norm=qk_norm, kv_projection='separate',
      tie_embeddings=bool(hf.get('tie_word_embeddings', False)),
      output_bias=False, **rope)


def _t(a: np.ndarray) -> np.ndarray:
  """torch Linear (out, in) -> flax kernel (in, out)."""
  return np.ascontiguousarray(a.T)


def _identity(a: np.ndarray) -> np.ndarray:
  return a


def _swiglu_in(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
  """gate, up (I, D) -> w_in [D, 2I] = [gate | up]."""
  return np.concatenate([gate.T, up.T], axis=1)


def _stack_in(num: int) -> Callable[..., np.ndarray]:
  """E gate then E up tensors (I, D) -> w_in [E, D, 2I]."""
  return lambda *a: np.stack([_swiglu_in(g, u)
                              for g, u in zip(a[:num], a[num:])])


def _stack_out(*down: np.ndarray) -> np.ndarray:
  """E down tensors (D, I) -> w_out [E, I, D]."""
  return np.stack([w.T for w in down])


def _fused_t(a: np.ndarray) -> np.ndarray:
  """(E, 2I, D) -> [E, D, 2I] (gate rows first = [gate | up] columns);
  (E, D, I) -> [E, I, D]."""
  return np.ascontiguousarray(np.swapaxes(a, 1, 2))


def _attention_entries(hf, family, pre, layer, d) -> list[families.Entry]:
  """q/k/v/o projections, their biases and the q/k norms of one layer."""
  entry = families.entry
  D, H, K, Dh = d['D'], d['H'], d['K'], d['Dh']
  bias, qk_norm = _attention(hf, family)
  att, attn = (layer, 'attention'), pre + 'self_attn.'
  out = [entry(attn + 'o_proj.weight', att + ('out', 'kernel'), (D, H * Dh),
               _t)]
  for name, flax_name, width in (('q', 'query', H * Dh),
                                 ('k', 'key', K * Dh),
                                 ('v', 'value', K * Dh)):
    out.append(entry(attn + f'{name}_proj.weight',
                     att + (flax_name, 'kernel'), (width, D), _t))
    if bias != 'none':
      out.append(entry(attn + f'{name}_proj.bias', att + (flax_name, 'bias'),
                       (width,), _identity))
  if bias == 'all':
    out.append(entry(attn + 'o_proj.bias', att + ('out', 'bias'), (D,),
                     _identity))
  if qk_norm != 'none':
    # Per head: (Dh,); OLMoE's full-projection norms: (H·Dh,) and (K·Dh,).
    q_width, k_width = ((Dh, Dh) if qk_norm == 'per_head' else
                        (H * Dh, K * Dh))
    out += [entry(attn + 'q_norm.weight', att + ('q_norm', 'scale'),
                  (q_width,), _identity),
            entry(attn + 'k_norm.weight', att + ('k_norm', 'scale'),
                  (k_width,), _identity)]
  return out


def _expert_entries(hf, family, layout, pre, layer,
                    d) -> list[families.Entry]:
  """Router, routed experts and shared expert(s) of one layer."""
  entry, Entry = families.entry, families.Entry  # pylint: disable=invalid-name
  D, E, I = d['D'], d['E'], d['I']
  moe = (layer, 'moe')
  per_expert = layout == 'per_expert'
  # Mixtral's legacy prefix; transformers 5 renames it to mlp. when fusing.
  mlp = pre + ('block_sparse_moe.' if family == 'mixtral' and per_expert
               else 'mlp.')
  out = [entry(mlp + 'gate.weight', moe + ('router', 'router', 'w'),
               (E, D), _t)]
  if per_expert:
    names = (('w1', 'w3', 'w2') if family == 'mixtral' else
             ('gate_proj', 'up_proj', 'down_proj'))
    gate, up, down = ([mlp + f'experts.{e}.{n}.weight' for e in range(E)]
                      for n in names)
    out += [Entry(tuple(gate + up), moe + ('experts', 'w_in'),
                  ((I, D),) * (2 * E), _stack_in(E)),
            Entry(tuple(down), moe + ('experts', 'w_out'), ((D, I),) * E,
                  _stack_out)]
  else:
    out += [entry(mlp + 'experts.gate_up_proj', moe + ('experts', 'w_in'),
                  (E, 2 * I, D), _fused_t),
            entry(mlp + 'experts.down_proj', moe + ('experts', 'w_out'),
                  (E, D, I), _fused_t)]
  shared, shared_width, _ = _shared(hf, family)
  if shared:
    width = shared * shared_width
    name = mlp + ('shared_expert.' if family == 'qwen2_moe' else
                  'shared_experts.')
    out += [Entry((name + 'gate_proj.weight', name + 'up_proj.weight'),
                  moe + ('shared', 'w_in'), ((width, D), (width, D)),
                  _swiglu_in),
            entry(name + 'down_proj.weight', moe + ('shared', 'w_out'),
                  (D, width), _t)]
    if family == 'qwen2_moe':
      out.append(entry(mlp + 'shared_expert_gate.weight',
                       moe + ('shared_gate',), (1, D), _t))
  return out


def key_table(hf: Mapping[str, Any], family: str,
              layout: str = 'per_expert') -> list[families.Entry]:
  """Every trainable tensor of the family's checkpoint and where it goes."""
  if layout not in LAYOUTS:
    raise ValueError(f'layout: expected one of {LAYOUTS}, got {layout!r}')
  _check_supported(hf, family)
  entry = families.entry
  d = dims(hf, family)
  V, D = d['V'], d['D']
  out = [entry('model.embed_tokens.weight', ('embedding',), (V, D),
               _identity),
         entry('model.norm.weight', ('ln_final', 'scale'), (D,), _identity)]
  if not hf.get('tie_word_embeddings', False):
    out.append(entry('lm_head.weight', ('output', 'kernel'), (V, D), _t))
  for i in range(d['L']):
    pre, layer = f'model.layers.{i}.', f'layer_{i}'
    out += [entry(pre + 'input_layernorm.weight', (layer, 'ln1', 'scale'),
                  (D,), _identity),
            entry(pre + 'post_attention_layernorm.weight',
                  (layer, 'ln2', 'scale'), (D,), _identity)]
    out += _attention_entries(hf, family, pre, layer, d)
    out += _expert_entries(hf, family, layout, pre, layer, d)
  return out


def state_table(hf: Mapping[str, Any],
                family: str) -> list[families.Entry]:
  """The 'router_state' tensors: glm4_moe's e_score_correction_bias [E]."""
  if family != 'glm4_moe':
    return []
  d = dims(hf, family)
  return [families.entry(
      f'model.layers.{i}.mlp.gate.e_score_correction_bias',
      (f'layer_{i}', 'moe', 'router', 'router', 'bias'), (d['E'],),
      _identity) for i in range(d['L'])]


def ignored(hf: Mapping[str, Any], family: str) -> Callable[[str], bool]:
  """Checkpoint keys that hold nothing the model uses.

  glm4_moe checkpoints carry their multi-token-prediction layers as
  model.layers.{L + j}.* (transformers drops them on load too); a shared
  expert of width 0 (n_shared_experts=0, shared_expert_intermediate_size=0)
  is saved as empty tensors (and Qwen2-MoE's gate of an empty expert adds
  nothing).
  """
  num_layers = hf['num_hidden_layers']
  no_shared = ('.mlp.shared_expert', '.mlp.shared_experts.')
  empty_shared = (family in ('qwen2_moe', 'glm4_moe') and
                  not _shared(hf, family)[0])
  def ignore(key: str) -> bool:
    if family == 'glm4_moe' and key.startswith('model.layers.'):
      if int(key.split('.')[2]) >= num_layers:
        return True
    return empty_shared and any(n in key for n in no_shared)
  return ignore
