"""Image preprocessing of the vision tower, equal to Hugging Face's processors.

  file ─ load_image: open, mode check, .convert('RGB') (LLaVA) ─► PIL RGB
  PIL RGB ─ preprocess(spec):
    [aspect 'pad': expand2square onto the mean colour (LLaVA)]
    resize (PIL, spec.resample)   'exact': to (H, W)           SigLIP
                                  'shortest_edge': short side = size,
                                  long side int(size * long / short)  CLIP
    [center crop to crop_size (zero-padded when smaller), CLIP]
    rescale: float32(uint8 * float64 rescale_factor)
    normalize: (x - mean) / std in float32
  ─► [H, W, 3] float32 (channels last, the towers' NHWC input)

Each step is the one transformers 5.24's SiglipImageProcessor /
CLIPImageProcessor run (their PIL backends, SiglipImageProcessorPil /
CLIPImageProcessorPil, which transformers uses when torchvision is absent):
transformers/image_processing_backends.py `PilBackend._preprocess`, with
`image_transforms.resize / center_crop / rescale / normalize` and
`get_resize_output_image_size(default_to_square=False)`. The output equals
their `pixel_values[0]` transposed to HWC, bit for bit on RGB input
(tests/data/test_images.py).

The 'pad' aspect is LLaVA's `image_aspect_ratio == 'pad'`
(llava/train/train.py `expand2square`, kept by LibMoE): the image is pasted
onto a square of colour `tuple(int(x * 255) for x in image_mean)`, at
((side - w) // 2, (side - h) // 2), and the square goes through the processor.

Image modes (load_image): LLaVA opens every image with `.convert('RGB')`,
and so does load_image for ACCEPTED_MODES: the 8-bit modes '1', 'L', 'LA',
'P', 'PA', 'RGB', 'RGBA', 'RGBX' and the colour spaces 'CMYK' (e.g. print
JPEGs), 'YCbCr', 'LAB', 'HSV', converted with PIL's formulas (an embedded
ICC profile is ignored by both, so the pixels are the ones LLaVA trains on).
Alpha is dropped, as LLaVA does (HF's own convert_to_rgb would composite
onto white instead; LLaVA hands the processor an image already converted).
The high-bit-depth and float modes ('I', 'I;16', 'I;16B', ..., 'F') raise
ValueError, a deliberate deviation: PIL clips them to 8 bits instead of
rescaling, so LLaVA would silently train on a mostly white image.
`check_image_file` reads only a file's header, so a pipeline can check every
image's mode when it is built.

Dimension legend: H, W output height / width (crop size, or the resized
size without a crop); h, w the input image's.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

import numpy as np
from PIL import Image

RESIZE_MODES = ('exact', 'shortest_edge')
ASPECTS = ('resize', 'pad')
# Modes whose .convert('RGB') keeps the picture (see the module docstring).
ACCEPTED_MODES = ('1', 'L', 'LA', 'P', 'PA', 'RGB', 'RGBA', 'RGBX', 'CMYK',
                  'YCbCr', 'LAB', 'HSV')
PREPROCESSOR_CONFIG = 'preprocessor_config.json'
# transformers' defaults (image_utils.py): IMAGENET_STANDARD (SigLIP) and
# OPENAI_CLIP mean / std.
_SIGLIP_DEFAULTS = dict(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
_CLIP_DEFAULTS = dict(mean=(0.48145466, 0.4578275, 0.40821073),
                      std=(0.26862954, 0.26130258, 0.27577711))


def _pair(value: Any, field: str) -> tuple[int, int]:
  """An int n -> (n, n); a (height, width) pair -> itself, as ints."""
  if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
    return int(value), int(value)
  if isinstance(value, (tuple, list)) and len(value) == 2:
    return int(value[0]), int(value[1])
  raise ValueError(f'{field}={value!r}: expected an int or a (height, width) '
                   'pair.')


@dataclasses.dataclass(frozen=True)
class ImageSpec:
  """How an image becomes the tower's input (a SigLIP / CLIP processor).

  Attributes:
    size: 'exact': (height, width) of the resize (an int n means (n, n));
      'shortest_edge': the length of the image's short side after resizing.
    resize: 'exact' (SigLIP: size {'height', 'width'}) | 'shortest_edge'
      (CLIP: size {'shortest_edge'}, aspect kept, long side truncated).
    crop_size: (height, width) of the centre crop after the resize, or None
      (no crop).
    rescale_factor: pixel scale (1/255; 1.0 when the processor does not
      rescale).
    mean, std: per-channel normalisation ((0,0,0) / (1,1,1): none).
    resample: PIL resampling filter (3: BICUBIC, both processors).
    aspect: 'resize' (the processor alone) | 'pad' (LLaVA expand2square
      first, onto the mean colour).
  """

  size: int | tuple[int, int]
  resize: str = 'exact'
  crop_size: tuple[int, int] | None = None
  rescale_factor: float = 1 / 255
  mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
  std: tuple[float, float, float] = (0.5, 0.5, 0.5)
  resample: int = 3
  aspect: str = 'resize'

  def __post_init__(self):
    if self.resize not in RESIZE_MODES:
      raise ValueError(f'resize={self.resize!r}: expected one of '
                       f'{RESIZE_MODES}.')
    if self.aspect not in ASPECTS:
      raise ValueError(f'aspect={self.aspect!r}: expected one of {ASPECTS}.')
    if self.resize == 'exact':
      size = _pair(self.size, 'size')
    else:
      if not isinstance(self.size, (int, np.integer)):
        raise ValueError(f"size={self.size!r}: resize='shortest_edge' takes "
                         'one int, the short side.')
      size = int(self.size)
    if min(np.atleast_1d(size)) < 1:
      raise ValueError(f'size={self.size!r}: expected >= 1.')
    object.__setattr__(self, 'size', size)
    if self.crop_size is not None:
      crop = _pair(self.crop_size, 'crop_size')
      if min(crop) < 1:
        raise ValueError(f'crop_size={self.crop_size!r}: expected >= 1.')
      object.__setattr__(self, 'crop_size', crop)
    for name in ('mean', 'std'):
      value = tuple(float(x) for x in np.atleast_1d(getattr(self, name)))
      if len(value) == 1:
        value = value * 3
      if len(value) != 3:
        raise ValueError(f'{name}={getattr(self, name)!r}: expected 3 '
                         'values (R, G, B).')
      object.__setattr__(self, name, value)
    if any(s == 0 for s in self.std):
      raise ValueError(f'std={self.std!r}: expected non-zero values.')
    if self.resize == 'shortest_edge' and self.crop_size is None:
      # Output shapes would vary with the image's aspect ratio.
      raise ValueError("crop_size=None: resize='shortest_edge' needs a "
                       'crop size, so that every image has one shape.')

  @property
  def output_shape(self) -> tuple[int, int, int]:
    """(H, W, 3) of `preprocess`'s output."""
    if self.crop_size is not None:
      return (*self.crop_size, 3)
    return (*self.size, 3)

  def background(self) -> tuple[int, int, int]:
    """LLaVA's pad colour: tuple(int(x * 255) for x in image_mean)."""
    return tuple(int(x * 255) for x in self.mean)

  @classmethod
  def from_preprocessor_config(cls, path_or_dict: str | os.PathLike | Mapping,
                               *, aspect: str = 'resize') -> 'ImageSpec':
    """The spec of an HF preprocessor_config.json (SigLIP or CLIP).

    Sizes are read as transformers 5 reads them: size {'height', 'width'}
    -> 'exact'; {'shortest_edge'} or a bare int (legacy CLIP configs; both
    processors have default_to_square=False) -> 'shortest_edge'; crop_size
    an int or {'height', 'width'}, used when do_center_crop. Missing fields
    take the processor class's defaults.

    Args:
      path_or_dict: a model directory (its preprocessor_config.json), the
        json file, or its parsed dict.
      aspect: 'resize' | 'pad' (not part of the HF file; LLaVA's
        image_aspect_ratio).

    Raises:
      FileNotFoundError: no such file; ValueError: an empty path, a file
      that is not JSON, or fields this module does not implement (do_resize
      False, longest_edge, ...), named.
    """
    if isinstance(path_or_dict, Mapping):
      config, where = dict(path_or_dict), 'preprocessor config'
    else:
      path = os.fspath(path_or_dict)
      if not path:
        raise ValueError(
            "path_or_dict='': empty; expected an HF model directory with "
            f'{PREPROCESSOR_CONFIG}, the file, or its parsed dict.')
      if os.path.isdir(path):
        path = os.path.join(path, PREPROCESSOR_CONFIG)
      if not os.path.isfile(path):
        raise FileNotFoundError(
            f'path_or_dict={os.fspath(path_or_dict)!r}: no {path} (expected '
            f'an HF model directory with {PREPROCESSOR_CONFIG}, or the file).')
      try:
        with open(path, encoding='utf-8') as f:
          config = json.load(f)
      except ValueError as e:
        raise ValueError(f'{path}: not valid JSON ({e}).') from e
      where = path
    kind = str(config.get('image_processor_type',
                          config.get('feature_extractor_type', '')))
    clip = 'CLIP' in kind
    if not clip and 'Siglip' not in kind and kind:
      raise ValueError(f'{where}: image_processor_type={kind!r}: expected a '
                       'SiglipImageProcessor or CLIPImageProcessor.')
    defaults = _CLIP_DEFAULTS if clip else _SIGLIP_DEFAULTS

    def field(name, default):
      value = config.get(name)
      return default if value is None else value

    if not field('do_resize', True):
      raise ValueError(f'{where}: do_resize=False is not supported (the '
                       'tower needs a fixed input size).')
    size = field('size', {'shortest_edge': 224} if clip else
                 {'height': 224, 'width': 224})
    if isinstance(size, (int, float)):
      size = {'shortest_edge': int(size)}
    if not isinstance(size, Mapping):
      raise ValueError(f'{where}: size={size!r}: expected an int or a dict.')
    size = {k: v for k, v in size.items() if v is not None}
    if set(size) == {'height', 'width'}:
      resize, value = 'exact', (int(size['height']), int(size['width']))
    elif set(size) == {'shortest_edge'}:
      resize, value = 'shortest_edge', int(size['shortest_edge'])
    else:
      raise ValueError(f'{where}: size={size!r}: expected {{height, width}} '
                       'or {shortest_edge}.')
    crop = None
    if field('do_center_crop', clip):
      crop = field('crop_size', {'height': 224, 'width': 224})
      if isinstance(crop, Mapping):
        crop = (int(crop['height']), int(crop['width']))
    rescale = (float(field('rescale_factor', 1 / 255))
               if field('do_rescale', True) else 1.0)
    if field('do_normalize', True):
      mean = field('image_mean', defaults['mean'])
      std = field('image_std', defaults['std'])
    else:
      mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    return cls(size=value, resize=resize, crop_size=crop,
               rescale_factor=rescale, mean=tuple(np.atleast_1d(mean)),
               std=tuple(np.atleast_1d(std)),
               resample=int(field('resample', 3)), aspect=aspect)


def expand2square(image: Image.Image,
                  background: tuple[int, ...]) -> Image.Image:
  """LLaVA's expand2square: the image centred on a square of `background`."""
  width, height = image.size
  if width == height:
    return image
  side = max(width, height)
  result = Image.new(image.mode, (side, side), background)
  result.paste(image, ((side - width) // 2, (side - height) // 2))
  return result


def _resized_size(height: int, width: int, spec: ImageSpec) -> tuple[int, int]:
  """(height, width) after the resize (transformers' rounding)."""
  if spec.resize == 'exact':
    return spec.size
  # get_resize_output_image_size(default_to_square=False): the long side
  # is int(size * long / short), truncated.
  short, long = (width, height) if width <= height else (height, width)
  new_short, new_long = spec.size, int(spec.size * long / short)
  return (new_long, new_short) if width <= height else (new_short, new_long)


def _center_crop(array: np.ndarray, crop: tuple[int, int]) -> np.ndarray:
  """transformers' center_crop of [h, w, C]: zero-pads a too-small image."""
  h, w = array.shape[:2]
  ch, cw = crop
  top, left = (h - ch) // 2, (w - cw) // 2
  if top >= 0 and left >= 0:
    return array[top:top + ch, left:left + cw]
  nh, nw = max(ch, h), max(cw, w)
  out = np.zeros((nh, nw) + array.shape[2:], array.dtype)
  top_pad, left_pad = -(-(nh - h) // 2), -(-(nw - w) // 2)   # ceil
  out[top_pad:top_pad + h, left_pad:left_pad + w] = array
  top, left = (nh - ch) // 2, (nw - cw) // 2
  return out[top:top + ch, left:left + cw]


def _check_mode(mode: str, what: str) -> None:
  """ValueError naming the image and its mode unless ACCEPTED_MODES has it."""
  if mode not in ACCEPTED_MODES:
    raise ValueError(
        f'{what}: unsupported image mode {mode!r}; expected one of '
        f'{ACCEPTED_MODES} (PIL would clip a 16-bit, 32-bit integer or float '
        'image to 8 bits: convert the file to 8-bit RGB first).')


def to_rgb(image: Image.Image, *, what: str = 'image') -> Image.Image:
  """`image.convert('RGB')` for ACCEPTED_MODES; ValueError for others.

  Args:
    image: a PIL image.
    what: how messages name the image ('sample 7: image a.png').
  """
  if image.mode == 'RGB':
    return image
  _check_mode(image.mode, what)
  return image.convert('RGB')


def preprocess(image: Image.Image, spec: ImageSpec) -> np.ndarray:
  """One image -> the tower's input, as the HF processor (+ LLaVA pad).

  Args:
    image: a PIL image in an accepted mode (converted to RGB first, as
      `to_rgb`).
    spec: the ImageSpec.

  Returns:
    [H, W, 3] float32, H, W = spec.output_shape[:2].
  """
  image = to_rgb(image)
  if spec.aspect == 'pad':
    image = expand2square(image, spec.background())
  height, width = _resized_size(image.height, image.width, spec)
  # PIL sizes are (width, height).
  image = image.resize((width, height), resample=spec.resample)
  array = np.asarray(image)                                    # [h, w, 3] u8
  if spec.crop_size is not None:
    array = _center_crop(array, spec.crop_size)                # [H, W, 3]
  # transformers' rescale: float64 product, then float32.
  x = (array.astype(np.float64) * spec.rescale_factor).astype(np.float32)
  mean = np.asarray(spec.mean, np.float32)
  std = np.asarray(spec.std, np.float32)
  return (x - mean) / std                                      # [H, W, 3]


def _open(path: str, what: str) -> Image.Image:
  """Image.open with errors naming the image; reads the header only (PIL
  decodes the pixels on `load()`)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{what}: no such file.')
  try:
    return Image.open(path)
  except (OSError, Image.DecompressionBombError, SyntaxError) as e:
    raise ValueError(f'{what}: cannot be read as an image ({e}).') from e


def _describe(path: str, sample: Any, what: str | None) -> str:
  return what or f'sample {sample!r}: image {path!r}'


def check_image_file(path: str | os.PathLike, *, sample: Any = None,
                     what: str | None = None) -> None:
  """Checks that a file is an image in an accepted mode, from its header.

  No pixels are decoded, so checking every image of a dataset costs about
  one file open each; a file whose pixel data is corrupt still fails in
  `load_image`.

  Args:
    path: the image file.
    sample: the sample's id, named in errors.
    what: how errors name the image instead (default "sample 'id': image
      'path'").

  Raises:
    FileNotFoundError: no file at `path`.
    ValueError: not an image, or a mode outside ACCEPTED_MODES.
  """
  path = os.fspath(path)
  what = _describe(path, sample, what)
  with _open(path, what) as image:
    _check_mode(image.mode, what)


def load_image(path: str | os.PathLike, spec: ImageSpec, *,
               sample: Any = None, what: str | None = None) -> np.ndarray:
  """Opens an image file and preprocesses it.

  Args:
    path: the image file.
    spec: the ImageSpec.
    sample: the sample's id, named in errors.
    what: how errors name the image instead (default "sample 'id': image
      'path'").

  Returns:
    [H, W, 3] float32.

  Raises:
    FileNotFoundError: no file at `path` (names the sample and the path).
    ValueError: not an image, or a mode outside ACCEPTED_MODES (names the
      sample, the file and the mode).
  """
  path = os.fspath(path)
  what = _describe(path, sample, what)
  with _open(path, what) as image:
    try:
      image.load()
    except (OSError, SyntaxError) as e:
      raise ValueError(f'{what}: cannot be read as an image ({e}).') from e
    return preprocess(to_rgb(image, what=what), spec)
