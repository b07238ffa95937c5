"""Importing tiny random Hugging Face models: logits equal the torch forward.

Each family's model is built from its config by transformers (5.x, CPU
torch), saved with save_pretrained, imported by moe_jax.convert, and run on
a right-padded batch; the logits at real tokens must equal torch's to 1e-4
(float32). RoPE frequencies are checked against transformers' own
initialisers for every scaling scheme.
"""

import json
import math

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

from moe_jax.convert import hf_import  # pylint: disable=g-import-not-at-top
from moe_jax.models import rope  # pylint: disable=g-import-not-at-top
from tests.convert.logits import padded_batch  # pylint: disable=g-import-not-at-top
from tests.convert.logits import save_random_hf  # pylint: disable=g-import-not-at-top

# Small shapes: GQA (4 query heads, 2 kv heads), head_dim 16 != D / H.
COMMON = dict(vocab_size=128, hidden_size=48, intermediate_size=80,
              num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16,
              max_position_embeddings=64, rms_norm_eps=1e-5)

CASES = {
    'llama': ('LlamaConfig', dict(attention_bias=True)),
    'llama3_rope': ('LlamaConfig', dict(rope_parameters=dict(
        rope_type='llama3', rope_theta=50000.0, factor=8.0,
        low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=16))),
    'llama_yarn': ('LlamaConfig', dict(rope_parameters=dict(
        rope_type='yarn', rope_theta=10000.0, factor=4.0,
        original_max_position_embeddings=16))),
    'mistral': ('MistralConfig', dict(sliding_window=None)),
    'qwen2_tied': ('Qwen2Config', dict(tie_word_embeddings=True)),
    'qwen3': ('Qwen3Config', dict()),
    'phi3': ('Phi3Config', dict(pad_token_id=0)),
}


def build_hf(name, tmp_path):
  config_class, extra = CASES[name]
  kwargs = dict(COMMON, **extra)
  if config_class == 'Phi3Config':
    kwargs.pop('head_dim')                 # Phi-3 derives it: 48 / 4 = 12
  directory = tmp_path / name
  return save_random_hf(config_class, kwargs, directory), directory


@pytest.mark.parametrize('name', sorted(CASES))
def test_imported_logits_equal_torch(name, tmp_path):
  hf_model, directory = build_hf(name, tmp_path)
  tokens, mask = padded_batch()
  with torch.no_grad():
    want = hf_model(input_ids=torch.tensor(tokens),
                    attention_mask=torch.tensor(mask)).logits.numpy()
  model, params, kwargs = hf_import.import_hf(str(directory), progress=False)
  got, _ = model.apply({'params': params}, jnp.asarray(tokens, jnp.int32),
                       attention_mask=jnp.asarray(mask))
  real = mask.astype(bool)
  np.testing.assert_allclose(np.asarray(got)[real], want[real], atol=1e-4,
                             rtol=1e-4)
  assert kwargs['num_kv_heads'] == 2


@pytest.mark.parametrize('scaling', [
    None,
    dict(rope_type='linear', factor=4.0),
    dict(rope_type='llama3', factor=8.0, low_freq_factor=1.0,
         high_freq_factor=4.0, original_max_position_embeddings=32),
    dict(rope_type='yarn', factor=4.0, original_max_position_embeddings=32),
    dict(rope_type='yarn', factor=40.0, original_max_position_embeddings=32,
         beta_fast=16, beta_slow=2, mscale=0.707, mscale_all_dim=0.707),
])
def test_rope_frequencies_match_transformers(scaling):
  from transformers import modeling_rope_utils  # pylint: disable=g-import-not-at-top
  params = dict(rope_theta=10000.0, **(scaling or {'rope_type': 'default'}))
  config = transformers.LlamaConfig(
      hidden_size=64, num_attention_heads=2, head_dim=32,
      max_position_embeddings=256, rope_parameters=params)
  kind = params['rope_type']
  if kind == 'default':
    want, want_scale = transformers.models.llama.modeling_llama.\
        LlamaRotaryEmbedding.compute_default_rope_parameters(config)
  else:
    want, want_scale = modeling_rope_utils.ROPE_INIT_FUNCTIONS[kind](config)
  got, scale = rope.inverse_frequencies(32, 10000.0, scaling)
  np.testing.assert_allclose(got, want.numpy(), rtol=1e-6)
  assert math.isclose(scale, want_scale, rel_tol=1e-6)


def test_missing_and_misshaped_keys_name_the_key_and_file(tmp_path):
  _, directory = build_hf('llama', tmp_path)
  from moe_jax.convert import safetensors_io  # pylint: disable=g-import-not-at-top
  path = directory / 'model.safetensors'
  with safetensors_io.SafetensorsFile(path) as f:
    tensors = {k: f.get(k) for k in f.keys()}
  del tensors['model.layers.1.mlp.up_proj.weight']
  tensors['model.norm.weight'] = np.ones((7,), np.float32)
  safetensors_io.write_safetensors(path, tensors)
  with pytest.raises(ValueError) as error:
    hf_import.import_hf(str(directory), progress=False)
  text = str(error.value)
  assert ('missing key model.layers.1.mlp.up_proj.weight (expected shape '
          '(80, 48))') in text
  assert 'key model.norm.weight in' in text and 'has shape (7,), expected (48,)' in text


def test_unknown_architecture_is_refused(tmp_path):
  (tmp_path / 'config.json').write_text(json.dumps(
      {'architectures': ['GPT2LMHeadModel'], 'model_type': 'gpt2'}))
  with pytest.raises(ValueError, match="architectures \\['GPT2LMHeadModel'\\] "
                     'is not one moe_jax imports'):
    hf_import.import_hf(str(tmp_path), progress=False)
