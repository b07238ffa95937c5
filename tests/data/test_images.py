"""Image preprocessing against transformers' SigLIP / CLIP processors.

transformers 5.24 without torchvision runs SiglipImageProcessorPil /
CLIPImageProcessorPil; their pixel_values (CHW) transposed to HWC are the
reference, on scikit-learn's two sample photos (427 x 640) and random
images of odd sizes. The outputs agree bit for bit (checked to 1e-5).
"""

import numpy as np
from PIL import Image
import pytest

from moe_jax.data import images

ODD_SIZES = [(17, 31), (50, 7), (5, 5), (64, 63)]


@pytest.fixture(scope='module')
def test_images():
  datasets = pytest.importorskip('sklearn.datasets')
  photos = [Image.fromarray(a) for a in datasets.load_sample_images().images]
  rng = np.random.default_rng(0)
  noise = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
           for h, w in ODD_SIZES]
  return photos + noise


@pytest.fixture(scope='module')
def processors():
  transformers = pytest.importorskip('transformers')
  return {
      'siglip': transformers.SiglipImageProcessor(
          size={'height': 40, 'width': 36}),
      'clip': transformers.CLIPImageProcessor(size=33, crop_size=30),
      # A crop larger than the resize: transformers zero-pads.
      'clip_small': transformers.CLIPImageProcessor(size=20, crop_size=24),
  }


def _hf(processor, image):
  return processor(image, return_tensors='np')['pixel_values'][0].transpose(
      1, 2, 0)                                                    # [H, W, 3]


@pytest.mark.parametrize('name', ['siglip', 'clip', 'clip_small'])
def test_equals_transformers(processors, test_images, name, tmp_path):
  processor = processors[name]
  processor.save_pretrained(tmp_path)
  # From the saved directory, as a run reads the tower's files.
  spec = images.ImageSpec.from_preprocessor_config(tmp_path)
  assert spec.resize == ('exact' if name == 'siglip' else 'shortest_edge')
  for image in test_images:
    expected = _hf(processor, image)
    out = images.preprocess(image, spec)
    assert out.dtype == np.float32 and out.shape == spec.output_shape
    np.testing.assert_allclose(out, expected, atol=1e-5, rtol=0)


def test_legacy_clip_config_ints():
  """openai/clip-vit-large-patch14-336's preprocessor_config.json layout."""
  spec = images.ImageSpec.from_preprocessor_config({
      'crop_size': 336, 'do_center_crop': True, 'do_normalize': True,
      'do_resize': True, 'feature_extractor_type': 'CLIPFeatureExtractor',
      'image_mean': [0.48145466, 0.4578275, 0.40821073],
      'image_std': [0.26862954, 0.26130258, 0.27577711], 'resample': 3,
      'size': 336})
  assert spec == images.ImageSpec(
      size=336, resize='shortest_edge', crop_size=(336, 336),
      mean=(0.48145466, 0.4578275, 0.40821073),
      std=(0.26862954, 0.26130258, 0.27577711))
  assert spec.output_shape == (336, 336, 3)


def test_siglip_so400m_config():
  spec = images.ImageSpec.from_preprocessor_config({
      'do_normalize': True, 'do_rescale': True, 'do_resize': True,
      'image_mean': [0.5, 0.5, 0.5], 'image_std': [0.5, 0.5, 0.5],
      'image_processor_type': 'SiglipImageProcessor', 'resample': 3,
      'rescale_factor': 0.00392156862745098,
      'size': {'height': 384, 'width': 384}}, aspect='pad')
  assert spec.size == (384, 384) and spec.crop_size is None
  assert spec.aspect == 'pad' and spec.background() == (127, 127, 127)


def _hand_expand2square(image, colour):
  """A numpy version of LLaVA's expand2square."""
  a = np.asarray(image)
  h, w = a.shape[:2]
  side = max(h, w)
  out = np.empty((side, side, 3), np.uint8)
  out[:] = colour
  top, left = (side - h) // 2, (side - w) // 2
  out[top:top + h, left:left + w] = a
  return Image.fromarray(out)


@pytest.mark.parametrize('name', ['siglip', 'clip'])
def test_pad_aspect(processors, test_images, name):
  processor = processors[name]
  spec = images.ImageSpec.from_preprocessor_config(processor.to_dict(),
                                                   aspect='pad')
  colour = tuple(int(x * 255) for x in processor.image_mean)
  assert spec.background() == colour
  for image in test_images:
    expected = _hf(processor, _hand_expand2square(image, colour))
    np.testing.assert_allclose(images.preprocess(image, spec), expected,
                               atol=1e-5, rtol=0)


def _save(tmp_path, image, name):
  path = tmp_path / name
  image.save(path)
  return str(path)


@pytest.mark.filterwarnings('ignore:Palette images with Transparency')
@pytest.mark.parametrize('mode', ['1', 'L', 'LA', 'P', 'RGBA', 'RGB'])
def test_accepted_modes_convert_as_llava(tmp_path, mode):
  rng = np.random.default_rng(1)
  rgba = Image.fromarray(rng.integers(0, 256, (9, 13, 4), dtype=np.uint8),
                         'RGBA')
  image = rgba.convert(mode)
  path = _save(tmp_path, image, f'x_{mode}.png')
  spec = images.ImageSpec(size=8)
  with Image.open(path) as reopened:
    # LLaVA: Image.open(file).convert('RGB'); alpha dropped.
    expected = images.preprocess(reopened.convert('RGB'), spec)
  np.testing.assert_array_equal(
      images.load_image(path, spec, sample='s1'), expected)


@pytest.mark.parametrize('mode, ext', [('CMYK', 'jpg'), ('CMYK', 'tiff'),
                                       ('YCbCr', 'tiff'), ('LAB', 'tiff')])
def test_colour_spaces_convert_as_llava(tmp_path, mode, ext):
  rng = np.random.default_rng(3)
  rgb = Image.fromarray(rng.integers(0, 256, (9, 13, 3), dtype=np.uint8))
  path = _save(tmp_path, rgb.convert(mode), f'x_{mode}.{ext}')
  spec = images.ImageSpec(size=8)
  with Image.open(path) as reopened:
    assert reopened.mode == mode
    expected = images.preprocess(reopened.convert('RGB'), spec)
  images.check_image_file(path, sample='s1')
  np.testing.assert_array_equal(
      images.load_image(path, spec, sample='s1'), expected)


@pytest.mark.parametrize('mode, ext', [('I;16', 'png'), ('I', 'tiff'),
                                       ('F', 'tiff')])
def test_rejected_modes_name_sample_file_and_mode(tmp_path, mode, ext):
  image = Image.new(mode, (6, 5))
  path = _save(tmp_path, image, f'bad.{ext}')
  for check in (lambda: images.check_image_file(path, sample='sample-42'),
                lambda: images.load_image(path, images.ImageSpec(size=8),
                                          sample='sample-42')):
    with pytest.raises(ValueError) as e:
      check()
    message = str(e.value)
    assert "'sample-42'" in message and path in message
    assert repr(mode) in message


def test_missing_and_unreadable_files(tmp_path):
  spec = images.ImageSpec(size=8)
  missing = str(tmp_path / 'nope.png')
  with pytest.raises(FileNotFoundError, match="sample 'id7'.*nope.png"):
    images.load_image(missing, spec, sample='id7')
  junk = tmp_path / 'junk.png'
  junk.write_text('not an image')
  with pytest.raises(ValueError, match="sample 'id8'.*junk.png.*cannot be"):
    images.load_image(str(junk), spec, sample='id8')
  # The header check finds both.
  with pytest.raises(FileNotFoundError, match="sample 'id7'.*nope.png"):
    images.check_image_file(missing, sample='id7')
  with pytest.raises(ValueError, match='my label: cannot be'):
    images.check_image_file(str(junk), what='my label')


def test_bad_specs():
  with pytest.raises(ValueError, match='resize='):
    images.ImageSpec(size=8, resize='longest')
  with pytest.raises(ValueError, match='aspect='):
    images.ImageSpec(size=8, aspect='crop')
  with pytest.raises(ValueError, match='crop_size=None'):
    images.ImageSpec(size=8, resize='shortest_edge')
  with pytest.raises(ValueError, match='do_resize'):
    images.ImageSpec.from_preprocessor_config({'do_resize': False})
  with pytest.raises(FileNotFoundError, match='preprocessor_config.json'):
    images.ImageSpec.from_preprocessor_config('/nonexistent-dir-xyz')
  with pytest.raises(ValueError, match="^path_or_dict='': empty"):
    images.ImageSpec.from_preprocessor_config('')


def test_unreadable_preprocessor_config_names_the_file(tmp_path):
  path = tmp_path / 'preprocessor_config.json'
  path.write_text('{"size": ')
  with pytest.raises(ValueError, match=f'^{path}: not valid JSON'):
    images.ImageSpec.from_preprocessor_config(tmp_path)
