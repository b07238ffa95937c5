"""LLaVA-format data through grain: conversations + images -> padded batches.

  read_llava_json: [{id, image?, conversations: [{from, value}]}] checked
  every sample ─ encode_conversation (template) ─► lengths; over-long ones
    (> S+1 tokens after `<image>` expands) raise, or are skipped and counted
  kept samples ─ length-grouped order (seed, epoch) ─ process slice ─
    batch
    ─► {'inputs' [B, S] int32, 'targets' [B, S] int32,
        'loss_mask' [B, S] float32, 'attention_mask' [B, S] int32,
        'images' [B, H, W, 3] float32}

A sample of L <= S+1 tokens is right-padded to S+1 with `pad_id`; inputs
are tokens[:-1] and targets tokens[1:]; loss_mask[t] = 1 iff targets[t] is
an assistant token (conversation.py), so padding, bos, image, system and
user tokens carry no loss; attention_mask[t] = 1 iff inputs[t] is a real
token (t < L). Text-only samples get zero images. Images are read and
preprocessed (images.py) when a sample is read, in grain's reader threads.

Length grouping is a simplified LLaVA `group_by_modality_length`
(llava/train/llava_trainer.py `get_length_grouped_indices`): each epoch the
samples are shuffled with (seed, epoch), cut into megabatches of
`megabatch_factor` global batches, each sorted by length (longest first),
cut into global batches, and the batches' order is shuffled with the same
generator; the incomplete last global batch of an epoch is dropped. (LLaVA
also keeps image and text-only samples in separate megabatches; not done
here.) Samples are padded to S either way; grouping keeps LLaVA's sample
order statistics and allows a later per-batch length cut.

Every step is a function of the batch index, so an iterator's state is one
integer ({'next_index'}) and `set_state` resumes exactly, as in
pipeline.py; process p of P reads rows [p*B, (p+1)*B) of every global batch
(pipeline.ProcessSliceMapDataset).

Errors name the file and the sample: '<file>: sample 'id': ...'.

Dimension legend: B batch (per process), G global batch, S sequence, L a
sample's tokens, H, W image size, P processes.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
import time
from typing import Any, Mapping, Sequence

from absl import logging
import grain
import numpy as np

from moe_jax.data import conversation as conversation_lib
from moe_jax.data import images as images_lib
from moe_jax.data import pipeline as pipeline_lib

TOO_LONG = ('error', 'skip')
# Over-long sample ids named in the skip log line and in summary().
_SHOW_IDS = 5


@dataclasses.dataclass(frozen=True)
class Sample:
  """One LLaVA sample: its id, image file (relative) or None, and turns."""

  id: str
  image: str | None
  conversations: tuple[Mapping[str, str], ...]


def _where(path: str, sample_id: Any) -> str:
  return f'{path}: sample {sample_id!r}'


def _check_sample(entry: Any, index: int, path: str) -> Sample:
  """One JSON entry -> Sample, or ValueError naming the file and sample."""
  if not isinstance(entry, Mapping):
    raise ValueError(f'{path}: entry {index}: expected an object with id, '
                     f'conversations (and image), got {type(entry).__name__}.')
  if 'id' not in entry:
    raise ValueError(f'{path}: entry {index}: missing field "id".')
  sid = entry['id']
  where = _where(path, sid)
  turns = entry.get('conversations')
  if turns is None:
    raise ValueError(f'{where}: missing field "conversations".')
  if not isinstance(turns, list) or not turns:
    raise ValueError(f'{where}: "conversations" must be a non-empty list of '
                     '{"from", "value"} objects.')
  for k, turn in enumerate(turns):
    if not isinstance(turn, Mapping):
      raise ValueError(f'{where}: conversations[{k}] is a '
                       f'{type(turn).__name__}, expected {{"from", "value"}}.')
    for name in ('from', 'value'):
      if name not in turn:
        raise ValueError(f'{where}: conversations[{k}]: missing field '
                         f'"{name}".')
    if turn['from'] not in conversation_lib.ROLES:
      raise ValueError(f'{where}: conversations[{k}].from={turn["from"]!r}: '
                       f'unknown role, expected one of '
                       f'{conversation_lib.ROLES}.')
    if not isinstance(turn['value'], str):
      raise ValueError(f'{where}: conversations[{k}].value: expected a '
                       f'string, got {type(turn["value"]).__name__}.')
  image = entry.get('image')
  if isinstance(image, (list, tuple)):
    raise ValueError(f'{where}: {len(image)} images in "image"; 1 image per '
                     'sample max.')
  if image is not None and (not isinstance(image, str) or not image):
    raise ValueError(f'{where}: "image" must be a file name, got {image!r}.')
  tags = conversation_lib.count_image_tags(turns)
  if image is None and tags:
    raise ValueError(f'{where}: {tags} <image> tag(s) but no "image" field.')
  if image is not None and tags > 1:
    raise ValueError(f'{where}: {tags} <image> tags but 1 image; 1 image '
                     'per sample max.')
  if image is not None and not tags:
    raise ValueError(f'{where}: has an image ({image!r}) but no <image> tag '
                     'in its conversations.')
  for k, turn in enumerate(turns):
    if turn['from'] == conversation_lib.GPT and (
        conversation_lib.IMAGE_TAG in turn['value']):
      raise ValueError(f'{where}: conversations[{k}] (gpt) holds the <image> '
                       'tag; it belongs in a human turn.')
  return Sample(str(sid), image,
                tuple({'from': t['from'], 'value': t['value']}
                      for t in turns))


def read_llava_json(path: str | os.PathLike) -> list[Sample]:
  """Reads and checks a LLaVA-format JSON file (a list of samples).

  Raises:
    FileNotFoundError: no file at `path`.
    ValueError: not JSON / not a list, or a bad sample: missing id /
      conversations / from / value, an unknown role, a list of images, more
      `<image>` tags than images, a tag without an image or an image without
      a tag, duplicate ids. Messages name the file and the sample id.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path}: no such LLaVA JSON file.')
  try:
    with open(path, encoding='utf-8') as f:
      entries = json.load(f)
  except ValueError as e:
    raise ValueError(f'{path}: not valid JSON ({e}).') from e
  if not isinstance(entries, list):
    raise ValueError(f'{path}: expected a JSON list of samples, got a '
                     f'{type(entries).__name__}.')
  samples = [_check_sample(e, i, path) for i, e in enumerate(entries)]
  seen = set()
  for s in samples:
    if s.id in seen:
      raise ValueError(f'{_where(path, s.id)}: duplicate id.')
    seen.add(s.id)
  return samples


# --------------------------------------------------------------------------
# The random-access source.


class LlavaSource:
  """Samples -> padded tokens, loss mask and preprocessed image (grain).

  Element i: {'tokens': [S+1] int32, 'loss_mask': [S+1] float32 (aligned
  with tokens), 'length': L int32, 'image': [H, W, 3] float32}.
  """

  def __init__(self, samples: Sequence[Sample], *, path: str,
               image_dir: str | os.PathLike, tokenizer: Any,
               spec: images_lib.ImageSpec, template: str, seq_len: int,
               image_token_id: int, num_image_tokens: int,
               add_bos: bool = True, pad_id: int = 0):
    self.samples = list(samples)
    self.path, self.image_dir = path, os.fspath(image_dir)
    self.tokenizer, self.spec, self.template = tokenizer, spec, template
    self.seq_len, self.pad_id = seq_len, pad_id
    self.image_token_id, self.num_image_tokens = (image_token_id,
                                                  num_image_tokens)
    self.add_bos = add_bos

  def __len__(self) -> int:
    return len(self.samples)

  def encode(self, index: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids [L] int32, loss_mask [L] float32) of sample `index`."""
    sample = self.samples[index]
    try:
      return conversation_lib.encode_conversation(
          sample.conversations, self.tokenizer, self.template,
          image_token_id=self.image_token_id,
          num_image_tokens=self.num_image_tokens, add_bos=self.add_bos)
    except ValueError as e:
      raise ValueError(f'{_where(self.path, sample.id)}: {e}') from e

  def image_path(self, index: int) -> str | None:
    image = self.samples[index].image
    return None if image is None else os.path.join(self.image_dir, image)

  def __getitem__(self, index: int) -> dict[str, Any]:
    if not 0 <= index < len(self):
      raise IndexError(f'sample {index} out of range [0, {len(self)}).')
    ids, mask = self.encode(index)
    length = len(ids)
    if length > self.seq_len + 1:
      raise ValueError(f'{_where(self.path, self.samples[index].id)}: '
                       f'{length} tokens > seq_len + 1 = {self.seq_len + 1}.')
    tokens = np.full([self.seq_len + 1], self.pad_id, np.int32)   # [S+1]
    loss = np.zeros([self.seq_len + 1], np.float32)               # [S+1]
    tokens[:length], loss[:length] = ids, mask
    path = self.image_path(index)
    if path is None:
      image = np.zeros(self.spec.output_shape, np.float32)        # [H, W, 3]
    else:
      try:
        image = images_lib.load_image(path, self.spec,
                                      sample=self.samples[index].id)
      except (FileNotFoundError, ValueError) as e:
        # The same kind, with the JSON file in front.
        raise type(e)(f'{self.path}: {e}') from e
    return {'tokens': tokens, 'loss_mask': loss,
            'length': np.int32(length), 'image': image}

  def __repr__(self) -> str:
    return (f'LlavaSource({self.path!r}, samples={len(self)}, '
            f'template={self.template!r}, seq_len={self.seq_len})')


# --------------------------------------------------------------------------
# Order: length-grouped (training) or file order (validation).


def length_grouped_order(lengths: np.ndarray, *, global_batch: int,
                         seed: int, epoch: int,
                         megabatch_factor: int = 8) -> np.ndarray:
  """One epoch's sample order [n // G * G] (see the module docstring).

  Args:
    lengths: [n] tokens of each sample.
    global_batch: G.
    seed, epoch: the generator is np.random.default_rng([seed, epoch]).
    megabatch_factor: global batches per megabatch.
  """
  n = len(lengths)
  rng = np.random.default_rng([seed, epoch])
  perm = rng.permutation(n)
  mega = global_batch * megabatch_factor
  groups = []
  for start in range(0, n, mega):
    idx = perm[start:start + mega]
    # Longest first; stable, so equal lengths keep the shuffled order.
    groups.append(idx[np.argsort(-lengths[idx], kind='stable')])
  grouped = np.concatenate(groups) if groups else perm
  num_batches = n // global_batch
  batches = grouped[:num_batches * global_batch].reshape(num_batches,
                                                         global_batch)
  return batches[rng.permutation(num_batches)].reshape(-1)


class OrderedMapDataset(grain.MapDataset):
  """parent[order(epoch)[position]] for element epoch * n_epoch + position.

  Args:
    parent: the sample MapDataset.
    order_fn: epoch -> sample indices of that epoch [n_epoch] (cached).
    per_epoch: n_epoch, elements per epoch.
    num_epochs: passes (None: forever).
  """

  def __init__(self, parent: grain.MapDataset, order_fn, per_epoch: int,
               num_epochs: int | None):
    super().__init__(parent)
    self._order = functools.lru_cache(maxsize=2)(order_fn)
    self._per_epoch = per_epoch
    self._length = (sys.maxsize if num_epochs is None
                    else per_epoch * num_epochs)

  def __len__(self) -> int:
    return self._length

  def _parent_index(self, index: int) -> int:
    epoch, position = divmod(index, self._per_epoch)
    return int(self._order(epoch)[position])

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    return self._parent[self._parent_index(index)]

  def _getitems(self, indices: Sequence[int]):
    return self._parent._getitems(  # pylint: disable=protected-access
        [self._parent_index(i) for i in indices])

  def __str__(self) -> str:
    return f'OrderedMapDataset(per_epoch={self._per_epoch})'


def _to_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  tokens, loss = batch['tokens'], batch['loss_mask']           # [B, S+1]
  seq_len = tokens.shape[1] - 1
  positions = np.arange(seq_len)[None]                         # [1, S]
  return {
      'inputs': tokens[:, :-1].astype(np.int32),               # [B, S]
      'targets': tokens[:, 1:].astype(np.int32),               # [B, S]
      'loss_mask': loss[:, 1:].astype(np.float32),             # [B, S]
      'attention_mask': (positions < batch['length'][:, None]).astype(
          np.int32),                                           # [B, S]
      'images': batch['image'].astype(np.float32),             # [B, H, W, 3]
  }


# --------------------------------------------------------------------------
# Everything together.


@dataclasses.dataclass
class LlavaPipeline:
  """Training and validation batches of one process (pipeline.Pipeline's
  interface: train / valid, train_iterator, valid_iterator, summary).

  Attributes:
    train: grain.MapDataset of training batches (infinite by default).
    valid: grain.MapDataset of validation batches (file order), or None.
    seq_len, global_batch_size, local_batch_size: S, G, B = G / P.
    num_train_samples, num_valid_samples: samples kept in each split.
    num_skipped, skipped_ids: over-long samples skipped (too_long='skip')
      per split ({'train': n, 'valid': n}) and the first few of their ids.
    image_shape: (H, W, 3).
    vocab_size: the tokenizer's vocabulary.
    template: the conversation template.
  """

  train: Any
  valid: Any
  seq_len: int
  global_batch_size: int
  local_batch_size: int
  num_train_samples: int
  num_valid_samples: int
  num_skipped: dict[str, int]
  skipped_ids: dict[str, tuple[str, ...]]
  image_shape: tuple[int, int, int]
  vocab_size: int | None
  template: str
  num_train_tokens: int = 0
  num_threads: int = 2
  prefetch: int = 4

  @property
  def num_valid_batches(self) -> int:
    return len(self.valid) if self.valid is not None else 0

  def train_iterator(self, state: dict | None = None):
    """Training iterator, resumed from `state` (a get_state()) when given."""
    return pipeline_lib.make_iterator(self.train, state=state,
                                      num_threads=self.num_threads,
                                      prefetch=self.prefetch)

  def valid_iterator(self):
    """A fresh pass over the validation batches (same order every time)."""
    if self.valid is None:
      raise ValueError('no validation data: build the pipeline with '
                       '`valid_json`.')
    return pipeline_lib.make_iterator(self.valid, num_threads=self.num_threads,
                                      prefetch=self.prefetch)

  def summary(self) -> dict[str, Any]:
    """Sizes and skip counts for logging."""
    out = {k: getattr(self, k) for k in (
        'seq_len', 'global_batch_size', 'local_batch_size',
        'num_train_samples', 'num_valid_samples', 'num_valid_batches',
        'num_train_tokens', 'vocab_size', 'image_shape', 'template')}
    out['num_skipped_too_long'] = dict(self.num_skipped)
    out['skipped_ids'] = {k: list(v) for k, v in self.skipped_ids.items()}
    return out


def _lengths(source: LlavaSource, *, too_long: str, split: str,
             block: int = 1024
             ) -> tuple[np.ndarray, list[int], list[str]]:
  """(lengths [n], kept indices, skipped ids) of a source's samples.

  Lengths come from the rendered prompts' chunks, encoded in blocks of
  `block` samples with the tokenizer's encode_batch (parallel for
  HFTokenizer); equal to len(source.encode(i)[0]).
  """
  start = time.perf_counter()
  n = len(source)
  lengths = np.zeros([n], np.int64)
  encode_batch = getattr(source.tokenizer, 'encode_batch', None)
  for first in range(0, n, block):
    chunks, owners = [], []
    for i in range(first, min(first + block, n)):
      sample = source.samples[i]
      try:
        pieces = conversation_lib.prompt_chunks(sample.conversations,
                                                source.template)
      except ValueError as e:
        raise ValueError(f'{_where(source.path, sample.id)}: {e}') from e
      chunks += pieces
      owners += [i] * len(pieces)
    ids = (encode_batch(chunks) if encode_batch is not None else
           [source.tokenizer.encode(c) for c in chunks])
    counts: dict[int, list[int]] = {}
    for i, x in zip(owners, ids):
      counts.setdefault(i, []).append(len(x))
    for i, c in counts.items():
      lengths[i] = conversation_lib.encoded_length(
          c, source.tokenizer, num_image_tokens=source.num_image_tokens,
          add_bos=source.add_bos)
  limit = source.seq_len + 1
  kept = [i for i in range(n) if lengths[i] <= limit]
  skipped = [source.samples[i].id for i in range(n) if lengths[i] > limit]
  if skipped and too_long == 'error':
    i = int(np.argmax(lengths > limit))
    raise ValueError(
        f'{_where(source.path, source.samples[i].id)}: {lengths[i]} tokens '
        f'(an <image> counts {source.num_image_tokens}), more than seq_len '
        f'+ 1 = {limit}. Raise `seq_len`, or set `too_long`=\'skip\' to '
        f'drop such samples (counted and logged; {len(skipped)} of {n} '
        f'samples of {source.path} are too long).')
  if skipped:
    logging.warning('%s (%s): skipped %d of %d samples longer than seq_len + '
                    '1 = %d tokens, e.g. ids %s', source.path, split,
                    len(skipped), n, limit, skipped[:_SHOW_IDS])
  logging.info('%s: measured %d samples in %.1f s (%d kept)', source.path,
               n, time.perf_counter() - start, len(kept))
  return lengths, kept, skipped


def _check_images(source: LlavaSource) -> None:
  for i in range(len(source)):
    path = source.image_path(i)
    if path is not None and not os.path.isfile(path):
      raise FileNotFoundError(f'{_where(source.path, source.samples[i].id)}: '
                              f'image {path!r}: no such file.')


def build_llava_pipeline(
    train_json: str | os.PathLike,
    image_dir: str | os.PathLike,
    tokenizer: Any,
    spec: images_lib.ImageSpec,
    *,
    template: str,
    seq_len: int,
    global_batch_size: int,
    image_token_id: int,
    num_image_tokens: int,
    seed: int,
    valid_json: str | os.PathLike | None = None,
    valid_samples: int = 0,
    too_long: str = 'error',
    megabatch_factor: int = 8,
    add_bos: bool = True,
    pad_id: int = 0,
    check_images: bool = True,
    num_epochs: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    num_threads: int = 2,
    prefetch: int = 4,
) -> LlavaPipeline:
  """LLaVA conversations + images -> training / validation batches.

  Args:
    train_json: LLaVA-format training samples.
    image_dir: the folder the samples' `image` fields are relative to.
    tokenizer: the LLM's tokenizer (tokenizer.HFTokenizer).
    spec: image preprocessing (images.ImageSpec).
    template: 'plain' | 'phi35' (conversation.py).
    seq_len: S; samples of up to S+1 tokens fit.
    global_batch_size: G, samples per step over all processes.
    image_token_id, num_image_tokens: `<image>` becomes N copies of the id.
    seed: shuffle / grouping seed.
    valid_json: optional validation samples (same image_dir), in file order.
    valid_samples: validation samples used (0: all complete global batches).
    too_long: 'error' (ValueError naming the sample) | 'skip' (counted in
      summary() and logged with the first ids).
    megabatch_factor: global batches per length-sorted megabatch.
    add_bos: start each sample with the tokenizer's bos (LLaVA).
    pad_id: id of the right padding (no loss, attention_mask 0).
    check_images: stat every image file up front (a missing one fails at
      build time instead of mid-run).
    num_epochs: passes over the training samples (None: forever).
    process_index, process_count: default jax.process_index()/count().
    num_threads, prefetch: grain reader threads and read-ahead batches.

  Returns:
    A LlavaPipeline.

  Raises:
    FileNotFoundError: a JSON or (check_images) image file is missing.
    ValueError: bad samples or settings; messages name the file and sample.
  """
  process_index, process_count = pipeline_lib.resolve_process(process_index,
                                                              process_count)
  conversation_lib._check_template(template)  # pylint: disable=protected-access
  if too_long not in TOO_LONG:
    raise ValueError(f'too_long={too_long!r}: expected one of {TOO_LONG}.')
  if seq_len < 1:
    raise ValueError(f'seq_len={seq_len}: expected >= 1.')
  if global_batch_size < 1 or global_batch_size % process_count:
    raise ValueError(
        f'global_batch_size={global_batch_size}: expected a positive multiple '
        f'of the process count {process_count}.')
  if megabatch_factor < 1:
    raise ValueError(f'megabatch_factor={megabatch_factor}: expected >= 1.')
  common = dict(image_dir=image_dir, tokenizer=tokenizer, spec=spec,
                template=template, seq_len=seq_len,
                image_token_id=image_token_id,
                num_image_tokens=num_image_tokens, add_bos=add_bos,
                pad_id=pad_id)
  local = global_batch_size // process_count
  train_path = os.fspath(train_json)
  source = LlavaSource(read_llava_json(train_path), path=train_path, **common)
  lengths, kept, skipped = _lengths(source, too_long=too_long, split='train')
  source = LlavaSource([source.samples[i] for i in kept], path=train_path,
                       **common)
  if check_images:
    _check_images(source)
  lengths = lengths[kept]
  if len(source) < global_batch_size:
    raise ValueError(
        f'global_batch_size={global_batch_size}: more than the {len(source)} '
        f'training samples of {train_path} ({len(skipped)} over-long ones '
        'skipped). Add data or lower `global_batch_size`.')
  per_epoch = len(source) // global_batch_size * global_batch_size

  def order(epoch: int) -> np.ndarray:
    return length_grouped_order(lengths, global_batch=global_batch_size,
                                seed=seed, epoch=epoch,
                                megabatch_factor=megabatch_factor)

  train = OrderedMapDataset(grain.MapDataset.source(source), order, per_epoch,
                            num_epochs)
  train = pipeline_lib.ProcessSliceMapDataset(
      train, global_batch_size, process_index, process_count)
  train = train.batch(local, drop_remainder=True).map(_to_batch)

  num_skipped = {'train': len(skipped)}
  skipped_ids = {'train': tuple(skipped[:_SHOW_IDS])}
  valid, num_valid = None, 0
  if valid_json is not None:
    valid_path = os.fspath(valid_json)
    vsource = LlavaSource(read_llava_json(valid_path), path=valid_path,
                          **common)
    _, vkept, vskipped = _lengths(vsource, too_long=too_long, split='valid')
    vsource = LlavaSource([vsource.samples[i] for i in vkept],
                          path=valid_path, **common)
    if check_images:
      _check_images(vsource)
    num_skipped['valid'] = len(vskipped)
    skipped_ids['valid'] = tuple(vskipped[:_SHOW_IDS])
    num_valid = min(valid_samples or len(vsource), len(vsource))
    num_valid = num_valid // global_batch_size * global_batch_size
    if not num_valid:
      raise ValueError(
          f'valid_json={valid_path!r}: {len(vsource)} usable samples '
          f'(valid_samples={valid_samples}) are fewer than one global batch '
          f'(`global_batch_size`={global_batch_size}).')
    valid = OrderedMapDataset(grain.MapDataset.source(vsource),
                              lambda epoch: np.arange(num_valid), num_valid, 1)
    valid = pipeline_lib.ProcessSliceMapDataset(
        valid, global_batch_size, process_index, process_count)
    valid = valid.batch(local, drop_remainder=True).map(_to_batch)

  return LlavaPipeline(
      train=train, valid=valid, seq_len=seq_len,
      global_batch_size=global_batch_size, local_batch_size=local,
      num_train_samples=len(source), num_valid_samples=num_valid,
      num_skipped=num_skipped, skipped_ids=skipped_ids,
      image_shape=spec.output_shape,
      vocab_size=getattr(tokenizer, 'vocab_size', None), template=template,
      num_train_tokens=int(lengths.sum()), num_threads=num_threads,
      prefetch=prefetch)
