"""SigLIP / CLIP vision towers: HF import and export equal transformers.

Tiny random SiglipVisionModel / CLIPVisionModel (float32, eager attention,
every tensor randomised, norms and biases included) are saved with
save_pretrained, imported by vision_families.import_tower, and run by
VisionTower; the features must equal torch's hidden_states[feature_layer]
(CLIP: patch rows) to 1e-4, at the training resolution and at another one
(interpolate_pos_encoding=True). Export and write_tiny_tower are checked by
loading their directories back into transformers.
"""

import json
import os
import re
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

from moe_jax.convert import safetensors_io  # pylint: disable=g-import-not-at-top
from moe_jax.convert import vision_families as vf  # pylint: disable=g-import-not-at-top
from moe_jax.models import vision  # pylint: disable=g-import-not-at-top

KINDS = {
    'siglip': ('SiglipVisionConfig', 'SiglipVisionModel'),
    'clip': ('CLIPVisionConfig', 'CLIPVisionModel'),
}
COMMON = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3,
              num_attention_heads=4, image_size=32, patch_size=8)
TOL = 1e-4


def _randomise(model):
  """Every tensor random (norm scales near 1) so any wrong mapping shows.

  Weights std 0.1 keep activations O(1) (float32 noise well under TOL);
  position and class embeddings std 0.5, so interpolating them matters.
  """
  with torch.no_grad():
    for name, p in model.named_parameters():
      norm = 'norm' in name and name.endswith('weight')
      std = 0.5 if ('position' in name or 'class' in name) else 0.1
      p.copy_(float(norm) + std * torch.randn_like(p))
  return model


def _load(kind, directory):
  return getattr(transformers, KINDS[kind][1]).from_pretrained(
      directory, attn_implementation='eager').eval()


@pytest.fixture(scope='module')
def hf_towers(tmp_path_factory):
  """kind -> (torch model, saved directory)."""
  out = {}
  for kind, (config_name, model_name) in KINDS.items():
    torch.manual_seed(0)
    config = getattr(transformers, config_name)(**COMMON)
    model = _randomise(getattr(transformers, model_name)(config)).eval()
    directory = str(tmp_path_factory.mktemp('vision') / kind)
    model.save_pretrained(directory)
    out[kind] = (_load(kind, directory), directory)
  return out


def _torch_hidden(model, pixels, interpolate=False):
  with torch.no_grad():
    out = model(torch.from_numpy(pixels.transpose(0, 3, 1, 2)),
                output_hidden_states=True,
                interpolate_pos_encoding=interpolate)
  return [h.numpy() for h in out.hidden_states]


def _features(kwargs, params, pixels, **options):
  feats, auxes = vision.VisionTower(**kwargs, **options).apply(
      {'params': params}, jnp.asarray(pixels))
  assert auxes == []
  return np.asarray(feats)


def _pixels(seed, h, w):
  return np.random.default_rng(seed).normal(size=(2, h, w, 3)).astype(
      np.float32)


@pytest.mark.parametrize('kind', sorted(KINDS))
def test_import_matches_transformers(hf_towers, kind):
  model, directory = hf_towers[kind]
  kwargs, params = vf.import_tower(directory)
  assert kwargs['kind'] == kind
  pixels = _pixels(0, 32, 32)
  hidden = _torch_hidden(model, pixels)
  for layer in (-2, 0, -1):
    want = hidden[layer][:, 1:] if kind == 'clip' else hidden[layer]
    np.testing.assert_allclose(
        _features(kwargs, params, pixels, feature_layer=layer), want,
        atol=TOL, err_msg=f'feature_layer={layer}')
  # Another resolution: bicubic position interpolation, as HF's.
  pixels = _pixels(1, 48, 40)
  want = _torch_hidden(model, pixels, interpolate=True)[-2]
  np.testing.assert_allclose(
      _features(kwargs, params, pixels, feature_select='full'), want,
      atol=TOL)


def test_import_inside_llava(tmp_path):
  """A transformers 5 LlavaForConditionalGeneration directory (and an open
  checkpoint): the prefix is found and the LLM / projector keys ignored."""
  torch.manual_seed(0)
  vision_config = transformers.SiglipVisionConfig(**COMMON)
  text_config = transformers.LlamaConfig(
      vocab_size=64, hidden_size=32, intermediate_size=48,
      num_hidden_layers=1, num_attention_heads=4)
  llava = transformers.LlavaForConditionalGeneration(
      transformers.LlavaConfig(vision_config=vision_config,
                               text_config=text_config,
                               image_token_index=63))
  _randomise(llava).eval()
  llava.save_pretrained(tmp_path)
  with safetensors_io.ShardedCheckpoint(tmp_path) as checkpoint:
    assert vf.detect_prefix(checkpoint.keys(),
                            str(tmp_path)) == 'vision_tower.'
    kwargs, params = vf.import_tower(checkpoint)
  kwargs2, params2 = vf.import_tower(str(tmp_path), prefix='vision_tower.')
  assert kwargs == kwargs2
  pixels = _pixels(2, 32, 32)
  want = _torch_hidden(llava.model.vision_tower, pixels)[-2]
  np.testing.assert_allclose(_features(kwargs, params, pixels), want,
                             atol=TOL)


@pytest.mark.parametrize('kind', sorted(KINDS))
def test_export_round_trip(hf_towers, kind, tmp_path):
  model, directory = hf_towers[kind]
  kwargs, params = vf.import_tower(directory)
  out = vf.export_tower(str(tmp_path / 'out'), kwargs, params)
  with open(os.path.join(out, 'config.json'), encoding='utf-8') as f:
    assert json.load(f)['model_type'] == f'{kind}_vision_model'
  reloaded = _load(kind, out)
  pixels = _pixels(3, 32, 32)
  for a, b in zip(_torch_hidden(model, pixels),
                  _torch_hidden(reloaded, pixels)):
    np.testing.assert_allclose(a, b, atol=1e-6)
  # And back: the same parameters, found under the exported prefix.
  kwargs2, params2 = vf.import_tower(out)
  assert kwargs2 == kwargs
  for path, value in _flat(params).items():
    np.testing.assert_array_equal(_flat(params2)[path], value, err_msg=path)


def _flat(tree, prefix=()):
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flat(value, prefix + (key,)))
    else:
      out['/'.join(prefix + (key,))] = np.asarray(value)
  return out


@pytest.mark.parametrize('kind', sorted(KINDS))
def test_write_tiny_tower_loads_in_transformers(kind, tmp_path):
  out = vf.write_tiny_tower(str(tmp_path / kind), kind, num_layers=2)
  model = _load(kind, out)
  kwargs, params = vf.import_tower(out)
  assert kwargs['num_layers'] == 2
  # Norm scales drawn around 1, not exactly 1.
  scale = np.asarray(params['layer_0']['ln1']['scale'])
  assert 0 < np.abs(scale - 1).max() < 0.2
  pixels = _pixels(4, 32, 32)
  want = _torch_hidden(model, pixels)[-2]
  want = want[:, 1:] if kind == 'clip' else want
  np.testing.assert_allclose(_features(kwargs, params, pixels), want,
                             atol=TOL)
  processor = transformers.AutoImageProcessor.from_pretrained(out)
  image = np.random.default_rng(5).integers(0, 256, (40, 36, 3), np.uint8)
  got = processor(images=image, return_tensors='np')['pixel_values']
  assert got.shape == (1, 3, 32, 32)
  with pytest.raises(FileExistsError):
    vf.write_tiny_tower(out, kind)


def _rewrite(src, dst, edit):
  """Copies an HF directory, with edit(tensors) applied to its weights."""
  shutil.copytree(src, dst)
  path = os.path.join(dst, safetensors_io.SINGLE_FILE)
  with safetensors_io.ShardedCheckpoint(dst) as checkpoint:
    tensors = dict(checkpoint.items())
  edit(tensors)
  safetensors_io.write_safetensors(path, tensors)


def test_missing_and_misshaped_keys_are_named(hf_towers, tmp_path):
  _, directory = hf_towers['clip']
  key = 'encoder.layers.1.mlp.fc2.weight'
  _rewrite(directory, tmp_path / 'missing', lambda t: t.pop(key))
  with pytest.raises(ValueError, match=r'missing key .*layers\.1\.mlp\.fc2'
                     r'\.weight \(expected shape \(32, 48\)\)'):
    vf.import_tower(str(tmp_path / 'missing'))

  def shrink(tensors):
    tensors['embeddings.class_embedding'] = np.zeros(31, np.float32)
  _rewrite(directory, tmp_path / 'shape', shrink)
  with pytest.raises(ValueError, match=r'embeddings\.class_embedding in .*'
                     r'model\.safetensors has shape \(31,\), expected \(32,\)'):
    vf.import_tower(str(tmp_path / 'shape'))


def test_unknown_prefix_names_the_checkpoint(hf_towers, tmp_path):
  _, directory = hf_towers['siglip']
  bad = tmp_path / 'no_patch'
  _rewrite(directory, bad,
           lambda t: t.pop('embeddings.patch_embedding.weight'))
  with pytest.raises(ValueError, match=re.escape(str(bad)) +
                     r": cannot tell the vision tower's key prefix: 0 keys"):
    vf.import_tower(str(bad))
  with pytest.raises(ValueError, match=r'^a\.ckpt: .* 2 keys end in'):
    vf.detect_prefix(['a.embeddings.patch_embedding.weight',
                      'b.embeddings.patch_embedding.weight'], 'a.ckpt')


def test_export_refuses_moe_towers(hf_towers, tmp_path):
  kwargs, params = vf.import_tower(hf_towers['siglip'][1])
  with pytest.raises(ValueError, match='dense_ffn'):
    vf.export_tower(str(tmp_path), dict(kwargs, dense_ffn=False), params)
