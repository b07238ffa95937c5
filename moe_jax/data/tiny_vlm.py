"""A tiny synthetic image-text set: one coloured shape per image.

`write_shapes_dataset(out_dir)` writes, deterministically from `seed`:

  images/train-00000.png ...   RGB PNGs, image_size x image_size: one
  images/eval-00000.png ...    shape (square | circle | triangle) in one
                               colour (red | green | blue | yellow) on a
                               white background; size and position vary
  pretrain.json                LLaVA format, 'plain' template: human
                               '<image>', gpt 'a red circle'
  sft.json                     LLaVA format, 'phi35' template, two turns:
                               '<image>\\nWhat colour is the shape?' -> 'red',
                               'What shape is it?' -> 'circle' (the order of
                               the two questions alternates)
  pretrain_valid.json,         the same for the eval images (validation
  sft_valid.json               loss)
  eval.jsonl                   multiple choice over the eval images, one
                               line per item: {id, image, question, options,
                               answer}; two items per image (colour: 4
                               options, chance 1/4; shape: 3, chance 1/3)
  meta.json                    the arguments, written last

Image paths are relative to `out_dir` (the image_dir of the pipeline).
The set is written into a temporary directory next to `out_dir` and renamed,
so a reader sees all of it or none; an existing complete set with the same
arguments is reused, one with other arguments is an error.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from typing import Any

import numpy as np
from PIL import Image
from PIL import ImageDraw

COLOURS = {'red': (220, 30, 30), 'green': (30, 170, 40),
           'blue': (30, 60, 220), 'yellow': (235, 200, 20)}
SHAPES = ('square', 'circle', 'triangle')
BACKGROUND = (255, 255, 255)
COLOUR_QUESTION = 'What colour is the shape?'
SHAPE_QUESTION = 'What shape is it?'
META = 'meta.json'


@dataclasses.dataclass(frozen=True)
class ShapesDataset:
  """Paths of a written shapes set (image paths are relative to root)."""

  root: str
  pretrain_json: str
  sft_json: str
  pretrain_valid_json: str
  sft_valid_json: str
  eval_jsonl: str

  @property
  def image_dir(self) -> str:
    return self.root


def _paths(root: str) -> ShapesDataset:
  return ShapesDataset(
      root=root, pretrain_json=os.path.join(root, 'pretrain.json'),
      sft_json=os.path.join(root, 'sft.json'),
      pretrain_valid_json=os.path.join(root, 'pretrain_valid.json'),
      sft_valid_json=os.path.join(root, 'sft_valid.json'),
      eval_jsonl=os.path.join(root, 'eval.jsonl'))


def draw_shape(shape: str, colour: str, image_size: int,
               rng: np.random.Generator) -> Image.Image:
  """One image: `shape` in `colour`, random size and centre, on white."""
  image = Image.new('RGB', (image_size, image_size), BACKGROUND)
  draw = ImageDraw.Draw(image)
  half = rng.uniform(0.22, 0.38) * image_size
  cx, cy = rng.uniform(half, image_size - half, size=2)
  box = [cx - half, cy - half, cx + half, cy + half]
  fill = COLOURS[colour]
  if shape == 'square':
    draw.rectangle(box, fill=fill)
  elif shape == 'circle':
    draw.ellipse(box, fill=fill)
  else:
    draw.polygon([(cx, cy - half), (cx - half, cy + half),
                  (cx + half, cy + half)], fill=fill)
  return image


def _labels(n: int, rng: np.random.Generator) -> list[tuple[str, str]]:
  """n (colour, shape) pairs, every combination equally often (+ rest)."""
  combos = [(c, s) for c in COLOURS for s in SHAPES]
  reps = -(-n // len(combos))
  order = rng.permutation(len(combos) * reps)[:n]
  return [combos[i % len(combos)] for i in order]


def _write_split(root: str, split: str, n: int, image_size: int,
                 rng: np.random.Generator):
  """Images of one split; returns (pretrain, sft, eval) records."""
  pretrain, sft, items = [], [], []
  for i, (colour, shape) in enumerate(_labels(n, rng)):
    sid = f'{split}-{i:05d}'
    rel = f'images/{sid}.png'
    draw_shape(shape, colour, image_size, rng).save(os.path.join(root, rel))
    pretrain.append({'id': sid, 'image': rel, 'conversations': [
        {'from': 'human', 'value': '<image>'},
        {'from': 'gpt', 'value': f'a {colour} {shape}'}]})
    qa = [(COLOUR_QUESTION, colour), (SHAPE_QUESTION, shape)]
    if i % 2:
      qa.reverse()
    turns = []
    for k, (question, answer) in enumerate(qa):
      turns.append({'from': 'human',
                    'value': f'<image>\n{question}' if k == 0 else question})
      turns.append({'from': 'gpt', 'value': answer})
    sft.append({'id': sid, 'image': rel, 'conversations': turns})
    items.append({'id': f'{sid}-colour', 'image': rel,
                  'question': COLOUR_QUESTION, 'options': list(COLOURS),
                  'answer': colour})
    items.append({'id': f'{sid}-shape', 'image': rel,
                  'question': SHAPE_QUESTION, 'options': list(SHAPES),
                  'answer': shape})
  return pretrain, sft, items


def dump_json(path: str, value: Any) -> None:
  """Writes `value` as indented JSON (the set's files, trace metadata)."""
  with open(path, 'w', encoding='utf-8') as f:
    json.dump(value, f, indent=1)


def _check_existing(root: str, meta: dict[str, Any]) -> ShapesDataset:
  """The set in `root` if its meta.json holds `meta`, else ValueError."""
  meta_path = os.path.join(root, META)
  if not os.path.isfile(meta_path):
    raise ValueError(f'out_dir={root!r}: exists but is not a shapes set '
                     f'(no {META}); choose another directory.')
  try:
    with open(meta_path, encoding='utf-8') as f:
      found = json.load(f)
  except ValueError as e:
    raise ValueError(f'out_dir={root!r}: {meta_path} is not valid JSON ({e}); '
                     'delete the directory or choose another.') from e
  if found != meta:
    raise ValueError(f'out_dir={root!r}: holds a shapes set written with '
                     f'{found}, not {meta}; delete it or choose another '
                     'directory.')
  return _paths(root)


def write_shapes_dataset(out_dir: str | os.PathLike, *, num_train: int = 512,
                         num_eval: int = 64, image_size: int = 32,
                         seed: int = 0) -> ShapesDataset:
  """Writes the shapes set into `out_dir` (or reuses a complete one).

  Args:
    out_dir: the directory of the set (created; its parent too).
    num_train, num_eval: images of each split.
    image_size: side of the square images (>= 8).
    seed: seed of labels, sizes and positions.

  Returns:
    The ShapesDataset paths.

  Raises:
    ValueError: bad sizes, or `out_dir` holds a set written with other
      arguments (or something else).
  """
  if num_train < 1 or num_eval < 1:
    raise ValueError(f'num_train={num_train}, num_eval={num_eval}: expected '
                     '>= 1 each.')
  if image_size < 8:
    raise ValueError(f'image_size={image_size}: expected >= 8.')
  root = os.path.abspath(os.fspath(out_dir))
  meta = {'kind': 'shapes', 'version': 1, 'num_train': num_train,
          'num_eval': num_eval, 'image_size': image_size, 'seed': seed}
  if os.path.exists(root):
    return _check_existing(root, meta)
  parent = os.path.dirname(root)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(dir=parent, prefix='.shapes-tmp-')
  try:
    os.makedirs(os.path.join(tmp, 'images'))
    rng = np.random.default_rng(seed)
    train = _write_split(tmp, 'train', num_train, image_size, rng)
    valid = _write_split(tmp, 'eval', num_eval, image_size, rng)
    dump_json(os.path.join(tmp, 'pretrain.json'), train[0])
    dump_json(os.path.join(tmp, 'sft.json'), train[1])
    dump_json(os.path.join(tmp, 'pretrain_valid.json'), valid[0])
    dump_json(os.path.join(tmp, 'sft_valid.json'), valid[1])
    with open(os.path.join(tmp, 'eval.jsonl'), 'w', encoding='utf-8') as f:
      for item in valid[2]:
        f.write(json.dumps(item) + '\n')
    dump_json(os.path.join(tmp, META), meta)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  try:
    os.replace(tmp, root)
  except OSError:
    # Another process renamed its set into place first: use theirs, if it
    # was written with the same arguments.
    shutil.rmtree(tmp, ignore_errors=True)
    if not os.path.isfile(os.path.join(root, META)):
      raise
    return _check_existing(root, meta)
  return _paths(root)
