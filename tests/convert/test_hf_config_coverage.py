"""Hugging Face config options at the edges of what conversion computes.

Import computes Mistral's and Phi-3's sliding windows exactly and refuses
what it cannot compute (Qwen2 / Qwen3's per-layer windows, Llama's
mlp_bias, an odd rotary width) naming the config field; `import` of an MoE
checkpoint says what to do instead. Export writes what transformers
computes (a per-head normed model with q/k/v biases ->
Qwen3 with a zero o_proj bias, logits to 1e-4) or refuses naming the field
(qk_norm='full'; Phi-3 rope_scaling), and keeps the chat template.
Upcycled routers start from N(0, 0.02²) (algorithms.md §10.1).

Expected numbers come from transformers' forward passes or by hand.
"""

import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

from moe_jax import upcycle_experiment  # pylint: disable=g-import-not-at-top
from moe_jax.convert import __main__ as cli  # pylint: disable=g-import-not-at-top,line-too-long
from moe_jax.convert import hf_export  # pylint: disable=g-import-not-at-top
from moe_jax.convert import hf_import  # pylint: disable=g-import-not-at-top
from moe_jax.convert import init_from_hf  # pylint: disable=g-import-not-at-top
from moe_jax.convert import tiny  # pylint: disable=g-import-not-at-top
from moe_jax.convert import upcycle  # pylint: disable=g-import-not-at-top
from moe_jax.models import decoder  # pylint: disable=g-import-not-at-top
from tests.convert import logits  # pylint: disable=g-import-not-at-top
from tests.convert.test_hf_import import COMMON  # pylint: disable=g-import-not-at-top

# GQA, head_dim 16 != D / H; Phi-3 derives head_dim = 48 / 4 = 12.
PHI3 = dict({k: v for k, v in COMMON.items() if k != 'head_dim'},
            pad_token_id=0)


def imported_logits(directory) -> np.ndarray:
  model, params, kwargs = hf_import.import_hf(str(directory), progress=False)
  del model
  return logits.jax_logits(kwargs, params)


# ---------------------------------------------------------------------------
# 1. Sliding windows

# Every-layer windows: imported as TransformerLM(sliding_window=4); the
# batch's 12-token rows see past the window.
WINDOWED = {
    'phi3': ('Phi3Config', dict(PHI3, sliding_window=4)),
    'mistral': ('MistralConfig', dict(COMMON, sliding_window=4)),
}


@pytest.mark.parametrize('name', sorted(WINDOWED))
def test_every_layer_windows_import_exactly(name, tmp_path):
  config_class, kwargs = WINDOWED[name]
  model = logits.save_random_hf(config_class, kwargs, tmp_path / name)
  _, params, imported = hf_import.import_hf(str(tmp_path / name),
                                            progress=False)
  assert imported['sliding_window'] == 4
  want = logits.torch_logits(model)
  np.testing.assert_allclose(logits.jax_logits(imported, params), want,
                             atol=1e-4, rtol=1e-4)
  # Not vacuous: without the window the logits differ.
  full = dict(imported, sliding_window=None)
  assert np.abs(logits.jax_logits(full, params) - want).max() > 1e-2


def test_phi3_mini_4k_window_is_kept(tmp_path):
  # Phi-3-mini-4k-instruct's config.json: window 2047 of a 4096 context.
  logits.save_random_hf('Phi3Config', dict(PHI3, sliding_window=2047,
                             max_position_embeddings=4096), tmp_path / 'p')
  _, _, imported = hf_import.import_hf(str(tmp_path / 'p'), progress=False)
  assert imported['sliding_window'] == 2047


def test_upcycled_windowed_mistral_exports_to_mixtral(tmp_path):
  # Mixtral windows every layer too: an upcycled Mistral keeps its window.
  logits.save_random_hf('MistralConfig', dict(COMMON, sliding_window=4),
                        tmp_path / 'm')
  _, params, imported = hf_import.import_hf(str(tmp_path / 'm'),
                                            progress=False)
  kwargs, params, state = upcycle.upcycle(
      imported, params, router='smoe', num_experts=4, top_k=2, noise=0.5,
      seed=3, router_options=dict(init_std=0.3))
  assert kwargs['sliding_window'] == 4
  out = hf_export.export_hf(kwargs, params, state, to='mixtral',
                            out_dir=str(tmp_path / 'out'), progress=False)
  assert json.loads((tmp_path / 'out' / 'config.json').read_text())[
      'sliding_window'] == 4
  np.testing.assert_allclose(
      logits.torch_logits(logits.load_hf(out)),
      logits.jax_logits(kwargs, params, state), atol=1e-4, rtol=1e-4)


# Qwen2 / Qwen3 window only some layers: refused.
REFUSED_WINDOWS = {
    'qwen2': ('Qwen2Config', dict(COMMON, use_sliding_window=True,
                                  sliding_window=4, max_window_layers=0)),
    'qwen3': ('Qwen3Config', dict(COMMON, use_sliding_window=True,
                                  sliding_window=4, max_window_layers=0)),
}


@pytest.mark.parametrize('name', sorted(REFUSED_WINDOWS))
def test_qwen_layer_windows_are_refused_naming_the_field(name, tmp_path):
  config_class, kwargs = REFUSED_WINDOWS[name]
  logits.save_random_hf(config_class, kwargs, tmp_path / name)
  with pytest.raises(ValueError, match='sliding_window=') as error:
    hf_import.import_hf(str(tmp_path / name), progress=False)
  assert 'max_position_embeddings' in str(error.value)
  assert 'use_sliding_window' in str(error.value)


def test_windowed_phi3_exports_to_phi3_only(tmp_path):
  model = logits.save_random_hf('Phi3Config', dict(PHI3, sliding_window=4), tmp_path / 'p')
  _, params, imported = hf_import.import_hf(str(tmp_path / 'p'),
                                            progress=False)
  out = hf_export.export_hf(imported, params, {}, to='phi3',
                            out_dir=str(tmp_path / 'out'), progress=False)
  assert json.loads((tmp_path / 'out' / 'config.json').read_text())[
      'sliding_window'] == 4
  np.testing.assert_allclose(logits.torch_logits(logits.load_hf(out)),
                             logits.torch_logits(model), atol=1e-4,
                             rtol=1e-4)
  with pytest.raises(hf_export.ExportError, match='sliding_window=4'):
    hf_export.export_hf(imported, params, {}, to='dense',
                        out_dir=str(tmp_path / 'dense'), progress=False)


ACCEPTED_WINDOWS = {
    # A window as wide as the context masks nothing.
    'phi3_full_window': ('Phi3Config', dict(PHI3, sliding_window=64)),
    # use_sliding_window, but no layer >= max_window_layers = 2 windows.
    'qwen2_no_sliding_layer': ('Qwen2Config', dict(
        COMMON, use_sliding_window=True, sliding_window=4,
        max_window_layers=2)),
    # The window only takes effect with use_sliding_window.
    'qwen3_window_unused': ('Qwen3Config', dict(
        COMMON, use_sliding_window=False, sliding_window=4,
        max_window_layers=0)),
}


@pytest.mark.parametrize('name', sorted(ACCEPTED_WINDOWS))
def test_windows_that_mask_nothing_import_exactly(name, tmp_path):
  config_class, kwargs = ACCEPTED_WINDOWS[name]
  model = logits.save_random_hf(config_class, kwargs, tmp_path / name)
  np.testing.assert_allclose(imported_logits(tmp_path / name),
                             logits.torch_logits(model), atol=1e-4,
                             rtol=1e-4)


def test_tiny_phi3_has_no_window(tmp_path):
  """The tiny Phi-3 fixture the VLM tests build on still imports."""
  out = tiny.write_tiny_hf(str(tmp_path / 'phi3'), 'phi3', d_model=64,
                           head_dim=16)
  config = json.loads((tmp_path / 'phi3' / 'config.json').read_text())
  assert config.get('sliding_window') is None
  hf_import.import_hf(out, progress=False)


# ---------------------------------------------------------------------------
# 2. --to=dense: q/k norms with biases

def _random_model(kwargs: dict, seed: int = 0) -> dict:
  """TransformerLM params with random norms (1 + N(0, 0.25)) and biases."""
  model = decoder.TransformerLM(**kwargs)
  params = nn.unbox(model.init(jax.random.key(seed),
                               jnp.zeros((1, 2), jnp.int32)))['params']
  rng = np.random.default_rng(seed)

  def draw(path, a):
    name = jax.tree_util.keystr(path)
    if 'scale' in name:
      return jnp.asarray(1 + rng.normal(0, .5, a.shape), jnp.float32)
    if 'bias' in name:
      return jnp.asarray(rng.normal(0, .5, a.shape), jnp.float32)
    return a

  return jax.tree_util.tree_map_with_path(draw, params)


@pytest.fixture(scope='module')
def qwen2_kwargs(tmp_path_factory):
  """An imported Qwen2's TransformerLM kwargs (q/k/v biases)."""
  directory = tmp_path_factory.mktemp('qwen2') / 'hf'
  logits.save_random_hf('Qwen2Config', COMMON, directory)
  _, _, kwargs = hf_import.import_hf(str(directory), progress=False)
  assert kwargs['attention_bias'] == 'qkv'
  return kwargs


def test_dense_export_of_qkv_biases_and_per_head_norm(qwen2_kwargs,
                                                      tmp_path):
  """Qwen3 holds both: its one attention_bias flag, o_proj bias zero."""
  kwargs = dict(qwen2_kwargs, qk_norm='per_head')
  params = _random_model(kwargs)
  out = hf_export.export_hf(kwargs, params, {}, to='dense',
                            out_dir=str(tmp_path / 'out'), progress=False)
  config = json.loads((tmp_path / 'out' / 'config.json').read_text())
  assert config['architectures'] == ['Qwen3ForCausalLM']
  np.testing.assert_allclose(logits.torch_logits(logits.load_hf(out)),
                             logits.jax_logits(kwargs, params), atol=1e-4,
                             rtol=1e-4)


@pytest.mark.parametrize('bias', ['none', 'qkv'])
def test_dense_export_refuses_full_qk_norm(qwen2_kwargs, bias, tmp_path):
  kwargs = dict(qwen2_kwargs, qk_norm='full', attention_bias=bias)
  with pytest.raises(hf_export.ExportError, match='qk_norm'):
    hf_export.export_hf(kwargs, _random_model(kwargs), {}, to='dense',
                        out_dir=str(tmp_path / 'out'), progress=False)
  assert not (tmp_path / 'out').exists()


# ---------------------------------------------------------------------------
# 3. --to=phi3 and rope_scaling

SCALINGS = {
    'linear': dict(rope_type='linear', factor=2.0),
    'llama3': dict(rope_type='llama3', factor=8.0, low_freq_factor=1.0,
                   high_freq_factor=4.0, original_max_position_embeddings=16),
    'yarn': dict(rope_type='yarn', factor=4.0,
                 original_max_position_embeddings=16),
}


@pytest.mark.parametrize('scheme', sorted(SCALINGS))
def test_phi3_export_refuses_rope_scaling(qwen2_kwargs, scheme, tmp_path):
  kwargs = dict(qwen2_kwargs, attention_bias='none',
                rope_scaling=SCALINGS[scheme])
  with pytest.raises(hf_export.ExportError,
                     match='rope_scaling.*Phi-3 accepts') as error:
    hf_export.export_hf(kwargs, _random_model(kwargs), {}, to='phi3',
                        out_dir=str(tmp_path / 'out'), progress=False)
  assert 'longrope' in str(error.value)
  assert not (tmp_path / 'out').exists()


def test_phi3_export_refuses_an_odd_rotary_width(qwen2_kwargs, tmp_path):
  # head_dim 16 x 0.5625 = 9 dims: transformers rotates 10, moe_jax 8.
  kwargs = dict(qwen2_kwargs, attention_bias='none', rope_fraction=0.5625)
  with pytest.raises(hf_export.ExportError, match='= 9 dims'):
    hf_export.export_hf(kwargs, _random_model(kwargs), {}, to='phi3',
                        out_dir=str(tmp_path / 'out'), progress=False)


# ---------------------------------------------------------------------------
# 4. Upcycled router init std

@pytest.fixture(scope='module')
def wide_llama(tmp_path_factory):
  """A tiny Llama wide enough for a sample std: D = 256."""
  return tiny.write_tiny_hf(
      str(tmp_path_factory.mktemp('llama') / 'hf'), 'llama', vocab_size=512,
      d_model=256, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=64,
      intermediate_size=128)


def _router_weights(config) -> np.ndarray:
  init_from_hf.resolve(config)
  params, _ = init_from_hf.initial_variables(config)
  return np.concatenate([
      np.asarray(params[f'layer_{i}']['moe']['router']['router']['w']).ravel()
      for i in range(config.model.num_layers)])


@pytest.mark.parametrize('arg', ['tiny', None])
@pytest.mark.parametrize('router', ['smoe', 'deepseek_v3'])
def test_upcycled_router_std_is_0_02(wide_llama, router, arg):
  config = upcycle_experiment.experiment(router, arg)
  config.init.hf_path = wide_llama
  config.moe.backend = 'blocked'
  w = _router_weights(config)
  # 2 layers x [256, 4 or 8] = 2048+ draws of N(0, 0.02²): the sample std's
  # standard error is 0.02 / sqrt(2n) <= 3.2e-4; allow 5 of them.
  assert w.size >= 2048
  assert abs(w.std() - 0.02) < 5 * 0.02 / math.sqrt(2 * w.size), w.std()


def test_upcycled_router_std_follows_an_explicit_override(wide_llama):
  config = upcycle_experiment.experiment('smoe', 'tiny')
  config.init.hf_path = wide_llama
  config.moe.backend = 'blocked'
  config.moe.router_options.init_std = 0.05
  w = _router_weights(config)
  assert abs(w.std() - 0.05) < 5 * 0.05 / math.sqrt(2 * w.size), w.std()


# ---------------------------------------------------------------------------
# 5. Tokenizer files

TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
            '{% endfor %}')


def test_export_keeps_the_chat_template(qwen2_kwargs, tmp_path):
  tokenizers = pytest.importorskip('tokenizers')
  vocab = {'<unk>': 0, '<s>': 1, '</s>': 2, 'a': 3, 'b': 4}
  backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(
      vocab, unk_token='<unk>'))
  backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  tokenizer = transformers.PreTrainedTokenizerFast(
      tokenizer_object=backend, bos_token='<s>', eos_token='</s>',
      unk_token='<unk>')
  tokenizer.chat_template = TEMPLATE
  tokenizer.save_pretrained(tmp_path / 'tok')
  params = _random_model(qwen2_kwargs)
  out = hf_export.export_hf(qwen2_kwargs, params, {}, to='dense',
                            out_dir=str(tmp_path / 'out'),
                            tokenizer_dir=str(tmp_path / 'tok'),
                            progress=False)
  loaded = transformers.AutoTokenizer.from_pretrained(out)
  assert loaded.chat_template == TEMPLATE
  messages = [{'role': 'user', 'content': 'a b'}]
  assert (loaded.apply_chat_template(messages, tokenize=False) ==
          '<|user|>a b')


def test_added_tokens_json_is_copied(tmp_path):
  (tmp_path / 'tok').mkdir()
  (tmp_path / 'tok' / 'added_tokens.json').write_text('{"<x>": 5}')
  (tmp_path / 'out').mkdir()
  hf_export.copy_tokenizer_files(str(tmp_path / 'tok'), str(tmp_path / 'out'))
  assert (tmp_path / 'out' / 'added_tokens.json').read_text() == '{"<x>": 5}'


# ---------------------------------------------------------------------------
# 6. Errors that say what is wrong

def test_llama_mlp_bias_is_refused_naming_it(tmp_path):
  logits.save_random_hf('LlamaConfig', dict(COMMON, mlp_bias=True), tmp_path / 'hf')
  # (The tmp path holds 'mlp_bias' too: match the config field itself.)
  with pytest.raises(ValueError, match=r'config\.json mlp_bias=True'):
    hf_import.import_hf(str(tmp_path / 'hf'), progress=False)


def test_odd_rotary_width_is_refused_on_import(tmp_path):
  # head_dim 12 x 0.75 = 9 rotated dims: transformers rotates 10, moe_jax 8.
  logits.save_random_hf('Phi3Config', dict(PHI3, partial_rotary_factor=0.75),
          tmp_path / 'hf')
  with pytest.raises(ValueError, match='partial_rotary_factor=0.75'):
    hf_import.import_hf(str(tmp_path / 'hf'), progress=False)


def test_even_partial_rotary_imports_exactly(tmp_path):
  # head_dim 12 x 0.5 = 6 rotated dims on both sides.
  model = logits.save_random_hf('Phi3Config', dict(PHI3, partial_rotary_factor=0.5),
                  tmp_path / 'hf')
  np.testing.assert_allclose(imported_logits(tmp_path / 'hf'),
                             logits.torch_logits(model), atol=1e-4,
                             rtol=1e-4)


def test_cli_import_of_an_moe_checkpoint_says_what_to_do(tmp_path, capsys):
  logits.save_random_hf('MixtralConfig', dict(
      {k: v for k, v in COMMON.items() if k != 'intermediate_size'},
      intermediate_size=32, num_local_experts=4, num_experts_per_tok=2),
          tmp_path / 'hf')
  status = cli.main(['import', f'--hf_dir={tmp_path / "hf"}',
                     f'--workdir={tmp_path / "w"}'])
  _, err = capsys.readouterr()
  assert status == 2
  assert 'is an MoE checkpoint (family mixtral)' in err, err
  assert 'inspect' in err and 'import_hf' in err
  assert 'is not one moe_jax imports' not in err
  assert not (tmp_path / 'w').exists()
