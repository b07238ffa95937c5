"""Tiny random HF models written without torch: transformers loads them
(model and tokenizer, offline) and computes moe_jax's logits; import_hf
reads back exactly the parameters drawn."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax.convert import families
from moe_jax.convert import hf_import
from moe_jax.convert import tiny
from moe_jax.data import tokenizer as tokenizer_lib
from moe_jax.models import decoder

# Digits, punctuation, a non-NFC 'é' (e + combining accent), a newline.
TEXT = ('12 * 7 = 84 . the small cat chases a red bird . id=0042 ; '
        'cafe\u0301\n  two  spaces')


@pytest.fixture(scope='module')
def written(tmp_path_factory):
  root = tmp_path_factory.mktemp('tiny')
  # qwen2 with tied embeddings: the one case without lm_head.weight.
  return {family: tiny.write_tiny_hf(str(root / family), family,
                                     tie_embeddings=family == 'qwen2',
                                     seed=7)
          for family in tiny.FAMILIES}


@pytest.mark.parametrize('family', tiny.FAMILIES)
def test_import_gives_back_the_parameters_drawn(written, family):
  _, params, kwargs = hf_import.import_hf(written[family], progress=False)
  hf = hf_import.read_hf_config(written[family])
  assert kwargs == families.model_kwargs(hf, family)
  assert (kwargs['attention_bias'], kwargs['qk_norm']) == {
      'llama': ('none', 'none'), 'qwen2': ('qkv', 'none'),
      'qwen3': ('none', 'per_head')}[family]
  drawn = tiny.random_params(kwargs, seed=7)
  assert (jax.tree_util.tree_structure(params) ==
          jax.tree_util.tree_structure(drawn))
  jax.tree.map(np.testing.assert_array_equal, params, drawn)
  # Llama: <s> 0, </s> 1; Qwen: <|endoftext|> 0 as both.
  assert (hf['bos_token_id'], hf['eos_token_id']) == (
      (0, 1) if family == 'llama' else (0, 0))


@pytest.mark.parametrize('family', tiny.FAMILIES)
def test_transformers_loads_model_and_tokenizer(written, family):
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  directory = written[family]
  auto = transformers.AutoTokenizer.from_pretrained(directory,
                                                    local_files_only=True)
  ours = tokenizer_lib.HFTokenizer(directory)
  ids = auto(TEXT, add_special_tokens=False).input_ids
  assert ids == ours.encode(TEXT)
  assert len(auto) == ours.vocab_size == 512
  assert (auto.bos_token_id, auto.eos_token_id) == (ours.bos_id, ours.eos_id)
  assert ours.eos_id is not None and ours.eos_id == (
      1 if family == 'llama' else 0)
  with open(f'{directory}/tokenizer_config.json', encoding='utf-8') as f:
    assert json.load(f)['tokenizer_class'] == 'PreTrainedTokenizerFast'

  model = transformers.AutoModelForCausalLM.from_pretrained(
      directory, dtype=torch.float32, local_files_only=True).eval()
  tokens = np.asarray([ids[:12], ids[-12:]], np.int64)
  with torch.no_grad():
    want = model(input_ids=torch.tensor(tokens)).logits.numpy()
  _, params, kwargs = hf_import.import_hf(directory, progress=False)
  got, _ = decoder.TransformerLM(**kwargs).apply(
      {'params': params}, jnp.asarray(tokens, jnp.int32))
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=1e-4)


def test_bad_arguments_name_the_field(tmp_path):
  with pytest.raises(ValueError, match='vocab_size'):
    tiny.write_tiny_hf(str(tmp_path / 'a'), vocab_size=100)
  with pytest.raises(ValueError, match='family'):
    tiny.write_tiny_hf(str(tmp_path / 'b'), 'mixtral')
  (tmp_path / 'c').mkdir()
  with pytest.raises(FileExistsError, match='exists'):
    tiny.write_tiny_hf(str(tmp_path / 'c'))
  assert sorted(p.name for p in tmp_path.iterdir()) == ['c']
