"""export_llava: a dense moe_jax Llava as transformers' LLaVA, and back.

A tiny Llava is made of the tiny random HF models (write_tiny_hf 'phi3', whose
tokenizer has '<image>', and write_tiny_tower 'siglip' / 'clip') with a
random projector, then exported:
  - LlavaForConditionalGeneration.from_pretrained (float32, eager) gives
    moe_jax's logits to 1e-4 on a right-padded batch whose rows hold image
    tokens (SigLIP + Phi-3 layout; CLIP with patch features + Llama layout);
  - import_llava reads back the same kwargs and identical params;
  - AutoProcessor.from_pretrained loads the directory offline: its
    pixel_values equal data.images.preprocess, '<image>' becomes N image
    tokens, and its chat template renders the training 'phi35' prompt;
  - an MoE tower / projector, and a tokenizer without '<image>', are refused
    and nothing is left behind.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

from moe_jax.convert import hf_import  # pylint: disable=g-import-not-at-top
from moe_jax.convert import llava as llava_import  # pylint: disable=g-import-not-at-top
from moe_jax.convert import llava_export  # pylint: disable=g-import-not-at-top
from moe_jax.convert import safetensors_io  # pylint: disable=g-import-not-at-top
from moe_jax.convert import tiny  # pylint: disable=g-import-not-at-top
from moe_jax.convert import vision_families  # pylint: disable=g-import-not-at-top
from moe_jax.data import conversation  # pylint: disable=g-import-not-at-top
from moe_jax.data import images as images_lib  # pylint: disable=g-import-not-at-top
from moe_jax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
from moe_jax.models import llava  # pylint: disable=g-import-not-at-top
from moe_jax.models import vision  # pylint: disable=g-import-not-at-top

S = 24
TOL = 1e-4


@pytest.fixture(scope='module')
def hf_dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp('llava_export')
  out = {'phi3': tiny.write_tiny_hf(
      str(root / 'phi3'), 'phi3', vocab_size=320, d_model=32, num_heads=4,
      num_kv_heads=2, head_dim=8, intermediate_size=48)}
  for kind in ('siglip', 'clip'):
    out[kind] = vision_families.write_tiny_tower(str(root / kind), kind)
  out['root'] = root
  return out


def _model(hf_dirs, kind):
  """(Llava kwargs, params): the tiny towers + Phi-3, random projector."""
  tower, tower_params = vision_families.import_tower(hf_dirs[kind])
  tower.update(feature_layer=-2, feature_select='patch')
  _, llm_params, llm = hf_import.import_hf(hf_dirs['phi3'], progress=False)
  image_id = tokenizer_lib.HFTokenizer(hf_dirs['phi3']).encode('<image>')
  assert len(image_id) == 1
  width = llm['d_model']
  kwargs = dict(tower=tower, llm=llm, projector_width=width,
                image_token_id=image_id[0], tower_ffn='dense',
                projector_ffn='dense', s2_scales=(1,))
  rng = np.random.default_rng(3)
  draw = lambda *shape: rng.normal(0, 0.3, shape).astype(np.float32)
  projector = {'ffn': {'ffn': {
      'w_in': draw(tower['d_model'], width), 'b_in': draw(width),
      'w_out': draw(width, width), 'b_out': draw(width)}}}
  params = {'vision': tower_params, 'projector': projector, 'llm': llm_params}
  return kwargs, params


def _export(hf_dirs, kwargs, params, out, **kw):
  return llava_export.export_llava(
      str(out), kwargs, params, tokenizer_dir=hf_dirs['phi3'],
      image_processor_config=os.path.join(
          hf_dirs[kwargs['tower']['kind']], 'preprocessor_config.json'),
      **kw)


def _batch(kwargs):
  """tokens, mask [2, S]: N image tokens in each row, row 1 right-padded;
  images [2, H, W, 3]."""
  n = vision.num_features(kwargs['tower']['kind'],
                                kwargs['tower']['image_size'],
                                kwargs['tower']['patch_size'],
                                kwargs['tower']['feature_select'])
  rng = np.random.default_rng(2)
  tokens = rng.integers(7, kwargs['llm']['vocab_size'], (2, S))
  mask = np.ones((2, S), np.int64)
  tokens[0, 1:1 + n] = kwargs['image_token_id']
  tokens[1, 3:3 + n] = kwargs['image_token_id']
  mask[1, 21:] = 0
  tokens[mask == 0] = 0
  size = kwargs['tower']['image_size']
  images = rng.normal(size=(2, size, size, 3)).astype(np.float32)
  return tokens, mask, images


@pytest.mark.parametrize('kind,text_target,arch', [
    ('siglip', None, 'Phi3ForCausalLM'),
    ('clip', 'dense', 'LlamaForCausalLM')])
def test_exported_llava_gives_our_logits_and_imports_back(
    hf_dirs, tmp_path, kind, text_target, arch):
  kwargs, params = _model(hf_dirs, kind)
  out = _export(hf_dirs, kwargs, params, tmp_path / 'llava',
                text_target=text_target)
  config = transformers.AutoConfig.from_pretrained(out, local_files_only=True)
  assert config.model_type == 'llava'
  assert config.text_config.architectures == [arch]
  assert config.vision_feature_select_strategy == (
      'full' if kind == 'siglip' else 'default')
  hf = transformers.LlavaForConditionalGeneration.from_pretrained(
      out, dtype=torch.float32, attn_implementation='eager',
      local_files_only=True).eval()
  tokens, mask, images = _batch(kwargs)
  with torch.no_grad():
    want = hf(input_ids=torch.tensor(tokens),
              attention_mask=torch.tensor(mask),
              pixel_values=torch.tensor(images).permute(0, 3, 1, 2)
              ).logits.numpy()
  got, _ = llava.Llava(**kwargs).apply(
      {'params': params}, jnp.asarray(tokens, jnp.int32),
      jnp.asarray(images), attention_mask=jnp.asarray(mask))
  real = mask.astype(bool)
  np.testing.assert_allclose(np.asarray(got)[real], want[real], atol=TOL,
                             rtol=TOL)

  back_kwargs, back = llava_import.import_llava(out)
  assert back_kwargs == kwargs
  flat = lambda t: {jax.tree_util.keystr(p): np.asarray(a) for p, a in
                    jax.tree_util.tree_flatten_with_path(t)[0]}
  want_params, got_params = flat(params), flat(back)
  assert want_params.keys() == got_params.keys()
  for path, value in want_params.items():
    np.testing.assert_array_equal(got_params[path], value, err_msg=path)
  # The llava-hf hub layout, no leftovers next to the directory.
  keys = safetensors_io.ShardedCheckpoint(out).keys()
  assert 'vision_tower.vision_model.embeddings.patch_embedding.weight' in keys
  assert 'language_model.lm_head.weight' in keys
  assert sorted(os.listdir(tmp_path)) == ['llava']


def test_auto_processor_loads_offline_and_matches_preprocess(hf_dirs,
                                                              tmp_path):
  kwargs, params = _model(hf_dirs, 'siglip')
  out = _export(hf_dirs, kwargs, params, tmp_path / 'llava')
  processor = transformers.AutoProcessor.from_pretrained(
      out, local_files_only=True)
  assert type(processor).__name__ == 'LlavaProcessor'
  rng = np.random.default_rng(5)
  image = Image.fromarray(rng.integers(0, 256, (45, 37, 3), np.uint8))
  prompt = '<image>\nWhat shape?'
  inputs = processor(images=image, text=prompt, return_tensors='np')
  spec = images_lib.ImageSpec.from_preprocessor_config(out)
  want = images_lib.preprocess(image, spec)                     # [H, W, 3]
  np.testing.assert_array_equal(
      inputs['pixel_values'][0].transpose(1, 2, 0), want)
  n = vision.num_features('siglip', 32, 8)
  ids = inputs['input_ids'][0]
  assert (ids == kwargs['image_token_id']).sum() == n
  # The training prompt, through the chat template.
  tokenizer = tokenizer_lib.HFTokenizer(hf_dirs['phi3'])
  train_ids = conversation.generation_prompt(
      'What shape?', tokenizer, 'phi35',
      image_token_id=kwargs['image_token_id'], num_image_tokens=n)
  for chat in ([{'role': 'user', 'content': prompt}],
               [{'role': 'user', 'content': [
                   {'type': 'image'}, {'type': 'text', 'text': 'What shape?'}
               ]}]):
    for apply in (processor.apply_chat_template,
                  processor.tokenizer.apply_chat_template):
      text = apply(chat, tokenize=False, add_generation_prompt=True)
      ids = processor(images=image, text=text, return_tensors='np')
      np.testing.assert_array_equal(ids['input_ids'][0], train_ids)


def test_moe_tower_or_projector_is_refused_leaving_nothing(hf_dirs, tmp_path):
  kwargs, params = _model(hf_dirs, 'siglip')
  for field in ('tower_ffn', 'projector_ffn'):
    moe = dict(kwargs, **{field: 'moe'})
    with pytest.raises(ValueError, match=f"{field}='moe'.*stock class.*"
                       'moe_jax_vlm'):
      _export(hf_dirs, moe, params, tmp_path / 'out')
  with pytest.raises(ValueError, match='s2_scales'):
    _export(hf_dirs, dict(kwargs, s2_scales=(1, 3)), params,
            tmp_path / 'out')
  assert os.listdir(tmp_path) == []


def test_tokenizer_without_image_token_is_refused(hf_dirs, tmp_path):
  kwargs, params = _model(hf_dirs, 'siglip')
  llama = tiny.write_tiny_hf(str(tmp_path / 'llama'), 'llama',
                             vocab_size=320, d_model=32, num_heads=4,
                             num_kv_heads=2, head_dim=8,
                             intermediate_size=48)
  with pytest.raises(ValueError, match="'<image>'.*add_special_tokens"):
    llava_export.export_llava(
        str(tmp_path / 'out'), kwargs, params, tokenizer_dir=llama,
        image_processor_config=hf_dirs['siglip'])
  # A run trained without '<image>' (its image token past the vocabulary).
  with pytest.raises(ValueError, match='image_token_id=320.*add_special'):
    llava_export.export_llava(
        str(tmp_path / 'out'), dict(kwargs, image_token_id=320), params,
        tokenizer_dir=hf_dirs['phi3'],
        image_processor_config=hf_dirs['siglip'])
  assert os.listdir(tmp_path) == ['llama']
