"""Importing tiny random Hugging Face MoE models: logits equal torch's.

As tests/convert/test_hf_import.py does for the dense families: each MoE
family's model (hidden 48, 2 layers, 4 experts, top-2) is built from its
config by transformers (5.x, CPU torch) with random norms, biases and
router biases, saved with save_pretrained, imported by moe_jax.convert and
run on a right-padded batch; the logits at real tokens must equal torch's
to 1e-4 (float32). The fused expert layout (save_original_format=False:
mlp.experts.gate_up_proj (E, 2I, D), down_proj (E, D, I)) must import to
exactly the same parameters as the per-expert one.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

# pylint: disable=g-import-not-at-top
from moe_jax.convert import hf_import
from moe_jax.convert import safetensors_io
from tests.convert.logits import padded_batch
# pylint: enable=g-import-not-at-top

# GQA (4 query heads, 2 kv heads), head_dim 16 != D / H, 4 experts, top-2.
COMMON = dict(vocab_size=128, hidden_size=48, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16,
              max_position_embeddings=64, rms_norm_eps=1e-5,
              num_experts_per_tok=2)

CASES = {
    'mixtral': ('MixtralConfig', dict(intermediate_size=40,
                                      num_local_experts=4)),
    # norm_topk_prob=False (the default): un-renormalised softmax weights.
    'qwen2_moe': ('Qwen2MoeConfig', dict(
        intermediate_size=80, moe_intermediate_size=40, num_experts=4,
        shared_expert_intermediate_size=56)),
    'qwen2_moe_norm_tied': ('Qwen2MoeConfig', dict(
        intermediate_size=80, moe_intermediate_size=40, num_experts=4,
        shared_expert_intermediate_size=56, norm_topk_prob=True,
        tie_word_embeddings=True)),
    'qwen3_moe': ('Qwen3MoeConfig', dict(
        intermediate_size=80, moe_intermediate_size=40, num_experts=4,
        norm_topk_prob=True, attention_bias=True)),
    # OLMoE's q/k norms span the whole projection (width hidden_size), so
    # its head width must be D / H = 12.
    'olmoe': ('OlmoeConfig', dict(intermediate_size=40, num_experts=4,
                                  head_dim=None, attention_bias=True,
                                  pad_token_id=0, eos_token_id=1)),
    # Group-limited routing that matters: 2 groups of 2, 1 kept, top-2;
    # scaled weights; 2 shared experts; per-head q/k norm; partial RoPE 0.5.
    'glm4_moe': ('Glm4MoeConfig', dict(
        intermediate_size=80, moe_intermediate_size=40, n_routed_experts=4,
        n_shared_experts=2, first_k_dense_replace=0, n_group=2,
        topk_group=1, routed_scaling_factor=2.5, use_qk_norm=True,
        attention_bias=True)),
    'glm4_moe_plain': ('Glm4MoeConfig', dict(
        intermediate_size=80, moe_intermediate_size=40, n_routed_experts=4,
        n_shared_experts=1, first_k_dense_replace=0)),
    # Sigmoid scores without renormalisation (the deepseek_v3 router's
    # normalize_topk=False), still scaled.
    'glm4_moe_unnormalised': ('Glm4MoeConfig', dict(
        intermediate_size=80, moe_intermediate_size=40, n_routed_experts=4,
        n_shared_experts=1, first_k_dense_replace=0, norm_topk_prob=False,
        routed_scaling_factor=2.5)),
}


def build_config(name, **overrides):
  config_class, extra = CASES[name]
  kwargs = {**COMMON, **extra, **overrides}
  if kwargs['head_dim'] is None:
    kwargs.pop('head_dim')
  return getattr(transformers, config_class)(**kwargs)


def build_hf(name, tmp_path, fused=False):
  config = build_config(name)
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(
      config, dtype=torch.float32).eval()
  # Random norms and biases too (the selection bias as well), so a wrong
  # mapping of any tensor shows; routers scaled up so that routing weights
  # are far from uniform, and routed experts so that their weights show in
  # the logits well above the tolerance.
  with torch.no_grad():
    for pname, p in model.named_parameters():
      if 'norm' in pname or pname.endswith('bias'):
        p.copy_(torch.randn_like(p) * 0.5 + (1.0 if 'norm' in pname else 0))
      elif pname.endswith('gate.weight'):
        p.copy_(torch.randn_like(p) * 0.3)
      elif '.experts.' in pname:
        p.mul_(2.5)
    for pname, b in model.named_buffers():
      if pname.endswith('e_score_correction_bias'):
        b.copy_(torch.randn_like(b) * 0.1)
  directory = tmp_path / (name + ('_fused' if fused else ''))
  model.save_pretrained(directory, save_original_format=not fused)
  return model, directory


def keys_of(directory):
  return set(safetensors_io.ShardedCheckpoint(str(directory)).keys())


@pytest.mark.parametrize('name', sorted(CASES))
def test_imported_logits_equal_torch(name, tmp_path):
  hf_model, directory = build_hf(name, tmp_path)
  assert not any(k.endswith('gate_up_proj') for k in keys_of(directory))
  tokens, mask = padded_batch()
  with torch.no_grad():
    want = hf_model(input_ids=torch.tensor(tokens),
                    attention_mask=torch.tensor(mask)).logits.numpy()
  model, params, state, kwargs = hf_import.import_hf_with_state(
      str(directory), progress=False)
  variables = {'params': params, **({'router_state': state} if state else {})}
  got, _ = model.apply(variables, jnp.asarray(tokens, jnp.int32),
                       attention_mask=jnp.asarray(mask))
  real = mask.astype(bool)
  np.testing.assert_allclose(np.asarray(got)[real], want[real], atol=1e-4,
                             rtol=1e-4)
  assert kwargs['dense_ffn'] is False
  assert (kwargs['ffn']['num_experts'], kwargs['ffn']['top_k']) == (4, 2)
  assert bool(state) == name.startswith('glm4')


@pytest.mark.parametrize('name', ['mixtral', 'qwen2_moe', 'olmoe',
                                  'glm4_moe'])
def test_fused_layout_imports_the_same_parameters(name, tmp_path):
  _, per_expert = build_hf(name, tmp_path)
  _, fused = build_hf(name, tmp_path, fused=True)
  fused_keys = keys_of(fused)
  assert 'model.layers.1.mlp.experts.gate_up_proj' in fused_keys
  assert not any('experts.0.' in k for k in fused_keys)
  _, want, want_state, _ = hf_import.import_hf_with_state(
      str(per_expert), progress=False)
  _, got, got_state, _ = hf_import.import_hf_with_state(str(fused),
                                                        progress=False)
  assert jax.tree.structure(got) == jax.tree.structure(want)
  jax.tree.map(np.testing.assert_array_equal, got, want)
  jax.tree.map(np.testing.assert_array_equal, got_state, want_state)


def test_sigmoid_gate_and_bias_params_land_where_the_model_reads_them(
    tmp_path):
  hf_model, directory = build_hf('qwen2_moe', tmp_path)
  _, params, _ = hf_import.import_hf(str(directory), progress=False)
  moe = params['layer_1']['moe']
  hf_gate = hf_model.model.layers[1].mlp.shared_expert_gate.weight
  np.testing.assert_array_equal(moe['shared_gate'], hf_gate.detach().T)
  assert moe['shared']['w_in'].shape == (48, 2 * 56)
  assert moe['experts']['w_in'].shape == (4, 48, 80)
  assert moe['experts']['w_out'].shape == (4, 40, 48)


def test_missing_and_misshaped_expert_keys_name_the_key_and_file(tmp_path):
  _, directory = build_hf('qwen3_moe', tmp_path)
  path = directory / 'model.safetensors'
  with safetensors_io.SafetensorsFile(path) as f:
    tensors = {k: f.get(k) for k in f.keys()}
  del tensors['model.layers.1.mlp.experts.3.up_proj.weight']
  tensors['model.layers.0.mlp.gate.weight'] = np.ones((5, 48), np.float32)
  safetensors_io.write_safetensors(path, tensors)
  with pytest.raises(ValueError) as error:
    hf_import.import_hf(str(directory), progress=False)
  text = str(error.value)
  assert ('missing key model.layers.1.mlp.experts.3.up_proj.weight '
          '(expected shape (40, 48))') in text
  assert ('key model.layers.0.mlp.gate.weight in' in text and
          'has shape (5, 48), expected (4, 48)' in text)


def test_misshaped_fused_experts_are_reported(tmp_path):
  _, directory = build_hf('mixtral', tmp_path, fused=True)
  path = directory / 'model.safetensors'
  with safetensors_io.SafetensorsFile(path) as f:
    tensors = {k: f.get(k) for k in f.keys()}
  key = 'model.layers.0.mlp.experts.gate_up_proj'
  tensors[key] = np.swapaxes(tensors[key], 1, 2).copy()   # (E, D, 2I)
  safetensors_io.write_safetensors(path, tensors)
  with pytest.raises(ValueError, match=f'key {key} in .* has shape '
                     r'\(4, 48, 80\), expected \(4, 80, 48\)'):
    hf_import.import_hf(str(directory), progress=False)


@pytest.mark.parametrize('name, overrides, field', [
    ('glm4_moe', dict(first_k_dense_replace=1), 'first_k_dense_replace'),
    ('qwen2_moe', dict(decoder_sparse_step=2), 'decoder_sparse_step'),
    ('qwen3_moe', dict(mlp_only_layers=[0]), 'mlp_only_layers'),
    ('olmoe', dict(clip_qkv=8.0), 'clip_qkv'),
    ('mixtral', dict(sliding_window=16), 'sliding_window'),
])
def test_unsupported_configs_are_refused_naming_the_field(name, overrides,
                                                          field, tmp_path):
  # The config alone: it is refused before any tensor is looked for.
  config = build_config(name, **overrides)
  config.architectures = [CASES[name][0].replace('Config', 'ForCausalLM')]
  config.save_pretrained(tmp_path)
  with pytest.raises(ValueError, match=f'config.json {field}='):
    hf_import.import_hf_with_state(str(tmp_path), progress=False)


def test_import_hf_refuses_to_drop_router_state(tmp_path):
  _, directory = build_hf('glm4_moe_plain', tmp_path)
  with pytest.raises(ValueError, match='import_hf_with_state'):
    hf_import.import_hf(str(directory), progress=False)


def test_glm4_moe_multi_token_prediction_layers_are_ignored(tmp_path):
  # GLM-4.5 checkpoints carry their MTP layer as model.layers.{L}.*, which
  # transformers drops on load; so does the import.
  _, directory = build_hf('glm4_moe_plain', tmp_path)
  path = directory / 'model.safetensors'
  with safetensors_io.SafetensorsFile(path) as f:
    tensors = {k: f.get(k) for k in f.keys()}
  tensors['model.layers.2.eh_proj.weight'] = np.ones((48, 96), np.float32)
  safetensors_io.write_safetensors(path, tensors)
  _, params, state, _ = hf_import.import_hf_with_state(str(directory),
                                                       progress=False)
  assert sorted(state) == ['layer_0', 'layer_1']
  assert 'layer_2' not in params
