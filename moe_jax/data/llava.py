"""LLaVA-format data through grain: conversations + images -> padded batches.

  read_llava_json: [{id, image?, conversations: [{from, value}]}] checked
  every sample ─ encode_conversation (template) ─► lengths; over-long ones
    (> S+1 tokens after `<image>` expands) raise, or are skipped and counted
  kept samples ─ image files' headers checked (exists, accepted mode)
  kept samples ─ length-grouped order (seed, epoch) ─ process slice ─
    batch
    ─► {'inputs' [B, S] int32, 'targets' [B, S] int32,
        'loss_mask' [B, S] float32, 'attention_mask' [B, S] int32,
        'images' [B, H, W, 3] float32}

A sample of L <= S+1 tokens is right-padded to S+1 with `pad_id`; inputs
are tokens[:-1] and targets tokens[1:]; loss_mask[t] = 1 iff targets[t] is
an assistant token (conversation.py), so padding, bos, image, system and
user tokens carry no loss, and their targets are set to 0 (a valid id even
when the image id is outside the LLM's vocabulary); attention_mask[t] = 1
iff inputs[t] is a real token (t < L). Text-only samples get zero images.
Images are read and preprocessed (images.py) when a sample is read, in
grain's reader threads.

Length grouping is a simplified LLaVA `group_by_modality_length`
(llava/train/llava_trainer.py `get_length_grouped_indices`): each epoch the
samples are shuffled with (seed, epoch), cut into megabatches of
`megabatch_factor` global batches, each sorted by length (longest first),
cut into global batches, and the batches' order is shuffled with the same
generator; the incomplete last global batch of an epoch is dropped. LLaVA's
megabatch is world_size x per-device batch (x gradient accumulation), i.e.
one global batch, the default megabatch_factor=1: grouping then never
changes which samples share a step, only their row order within it (and so
which process reads which sample). A factor > 1 makes steps of similar
lengths, as HF's group_by_length does. (LLaVA also keeps image and text-only
samples in separate megabatches and spreads each megabatch's lengths evenly
over the ranks; neither is done here.) Samples are padded to S either way.

Every step is a function of the batch index, so an iterator's state is one
integer ({'next_index'}) and `set_state` resumes exactly, as in
pipeline.py; process p of P reads rows [p*B, (p+1)*B) of every global batch
(pipeline.ProcessSliceMapDataset).

Errors name the file, the sample and its position in the file
('<file>: sample 'id' (entry i): ...'): ids need not be unique (LLaVA-Instruct
reuses the COCO image id of a picture across its conversations).

Dimension legend: B batch (per process), G global batch, S sequence, L a
sample's tokens, H, W image size, P processes.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import os
import sys
import time
from typing import Any, ClassVar, Mapping, Sequence

from absl import logging
import grain
import numpy as np

from moe_jax.data import conversation as conversation_lib
from moe_jax.data import images as images_lib
from moe_jax.data import pipeline as pipeline_lib
from moe_jax.data import tokenizer as tokenizer_lib

TOO_LONG = ('error', 'skip')
# Over-long sample ids named in the skip log line and in summary().
_SHOW_IDS = 5


@dataclasses.dataclass(frozen=True)
class Sample:
  """One LLaVA sample: its id, image file (relative) or None, turns, and
  its entry's position in the JSON file (ids may repeat; positions do not).
  """

  id: str
  image: str | None
  conversations: tuple[Mapping[str, str], ...]
  index: int


def _where(path: str, sample_id: Any, index: int) -> str:
  """How errors name a sample: "<file>: sample 'id' (entry i)"."""
  return f'{path}: sample {sample_id!r} (entry {index})'


def _check_sample(entry: Any, index: int, path: str) -> Sample:
  """One JSON entry -> Sample, or ValueError naming the file and sample."""
  if not isinstance(entry, Mapping):
    raise ValueError(f'{path}: entry {index}: expected an object with id, '
                     f'conversations (and image), got {type(entry).__name__}.')
  if 'id' not in entry:
    raise ValueError(f'{path}: entry {index}: missing field "id".')
  sid = entry['id']
  where = _where(path, sid, index)
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
                      for t in turns), index)


def read_llava_json(path: str | os.PathLike) -> list[Sample]:
  """Reads and checks a LLaVA-format JSON file (a list of samples).

  Raises:
    FileNotFoundError: no file at `path`.
    ValueError: not JSON / not a list, or a bad sample: missing id /
      conversations / from / value, an unknown role, a list of images, more
      `<image>` tags than images, a tag without an image or an image without
      a tag. Messages name the file, the sample id and its entry.
      Ids may repeat (LLaVA-Instruct reuses COCO image ids), as in LLaVA.
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
  return [_check_sample(e, i, path) for i, e in enumerate(entries)]


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

  def subset(self, indices: Sequence[int]) -> 'LlavaSource':
    """The same source over samples[indices] (e.g. the ones that fit)."""
    out = copy.copy(self)
    out.samples = [self.samples[i] for i in indices]
    return out

  def where(self, index: int) -> str:
    """How errors name sample `index`: "<file>: sample 'id' (entry i)"."""
    sample = self.samples[index]
    return _where(self.path, sample.id, sample.index)

  def encode(self, index: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids [L] int32, loss_mask [L] float32) of sample `index`."""
    sample = self.samples[index]
    try:
      return conversation_lib.encode_conversation(
          sample.conversations, self.tokenizer, self.template,
          image_token_id=self.image_token_id,
          num_image_tokens=self.num_image_tokens, add_bos=self.add_bos)
    except ValueError as e:
      raise ValueError(f'{self.where(index)}: {e}') from e

  def image_path(self, index: int) -> str | None:
    image = self.samples[index].image
    return None if image is None else os.path.join(self.image_dir, image)

  def __getitem__(self, index: int) -> dict[str, Any]:
    if not 0 <= index < len(self):
      raise IndexError(f'sample {index} out of range [0, {len(self)}).')
    ids, mask = self.encode(index)
    length = len(ids)
    if length > self.seq_len + 1:
      raise ValueError(f'{self.where(index)}: {length} tokens > seq_len + 1 '
                       f'= {self.seq_len + 1}.')
    tokens = np.full([self.seq_len + 1], self.pad_id, np.int32)   # [S+1]
    loss = np.zeros([self.seq_len + 1], np.float32)               # [S+1]
    tokens[:length], loss[:length] = ids, mask
    path = self.image_path(index)
    if path is None:
      image = np.zeros(self.spec.output_shape, np.float32)        # [H, W, 3]
    else:
      image = images_lib.load_image(
          path, self.spec, what=f'{self.where(index)}: image {path!r}')
    return {'tokens': tokens, 'loss_mask': loss,
            'length': np.int32(length), 'image': image}

  def __repr__(self) -> str:
    return (f'LlavaSource({self.path!r}, samples={len(self)}, '
            f'template={self.template!r}, seq_len={self.seq_len})')


# --------------------------------------------------------------------------
# Order: length-grouped (training) or file order (validation).


def length_grouped_order(lengths: np.ndarray, *, global_batch: int,
                         seed: int, epoch: int,
                         megabatch_factor: int = 1) -> np.ndarray:
  """One epoch's sample order [n // G * G] (see the module docstring).

  Args:
    lengths: [n] tokens of each sample.
    global_batch: G.
    seed, epoch: the generator is np.random.default_rng([seed, epoch]).
    megabatch_factor: global batches per megabatch (1: LLaVA's, the batches
      are those of a plain shuffle; > 1: batches of similar lengths).
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


class OrderedMapDataset(pipeline_lib.IndexMapDataset):
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

  def __str__(self) -> str:
    return f'OrderedMapDataset(per_epoch={self._per_epoch})'


def _to_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Padded samples [B, S+1] -> the model's shifted batch (module doc)."""
  tokens, loss = batch['tokens'], batch['loss_mask']           # [B, S+1]
  seq_len = tokens.shape[1] - 1
  positions = np.arange(seq_len)[None]                         # [1, S]
  loss_mask = loss[:, 1:].astype(np.float32)                   # [B, S]
  # Unlearned targets become 0: the image id may lie outside the LLM's
  # vocabulary (init_vlm uses len(tokenizer) without an `<image>` token),
  # where the cross-entropy's gather gives NaN, and NaN * 0 is NaN.
  targets = np.where(loss_mask > 0, tokens[:, 1:], 0)          # [B, S]
  return {
      'inputs': tokens[:, :-1].astype(np.int32),               # [B, S]
      'targets': targets.astype(np.int32),                     # [B, S]
      'loss_mask': loss_mask,                                  # [B, S]
      'attention_mask': (positions < batch['length'][:, None]).astype(
          np.int32),                                           # [B, S]
      'images': batch['image'].astype(np.float32),             # [B, H, W, 3]
  }


# --------------------------------------------------------------------------
# Everything together.


@dataclasses.dataclass
class LlavaPipeline(pipeline_lib.BatchIterators):
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

  NO_VALID: ClassVar[str] = 'build the pipeline with `valid_json`'

  def summary(self) -> dict[str, Any]:
    """Sizes and skip counts for logging."""
    out = {k: getattr(self, k) for k in (
        'seq_len', 'global_batch_size', 'local_batch_size',
        'num_train_samples', 'num_valid_samples', 'num_valid_batches',
        'num_train_tokens', 'vocab_size', 'image_shape', 'template')}
    out['num_skipped_too_long'] = dict(self.num_skipped)
    out['skipped_ids'] = {k: list(v) for k, v in self.skipped_ids.items()}
    return out


def _measure(source: LlavaSource, block: int = 1024) -> np.ndarray:
  """[n] int64 tokens of each of a source's samples.

  Lengths come from the rendered prompts' chunks, encoded in blocks of
  `block` samples with tokenizer.encode_many (parallel for HFTokenizer);
  equal to len(source.encode(i)[0]), without the loss-mask prefixes.
  """
  n = len(source)
  lengths = np.zeros([n], np.int64)
  for first in range(0, n, block):
    chunks, owners = [], []
    for i in range(first, min(first + block, n)):
      try:
        pieces = conversation_lib.prompt_chunks(
            source.samples[i].conversations, source.template)
      except ValueError as e:
        raise ValueError(f'{source.where(i)}: {e}') from e
      chunks += pieces
      owners += [i] * len(pieces)
    counts: dict[int, list[int]] = {}
    for i, ids in zip(owners,
                      tokenizer_lib.encode_many(source.tokenizer, chunks)):
      counts.setdefault(i, []).append(len(ids))
    for i, c in counts.items():
      lengths[i] = conversation_lib.encoded_length(
          c, source.tokenizer, num_image_tokens=source.num_image_tokens,
          add_bos=source.add_bos)
  return lengths


def _fitting(source: LlavaSource, lengths: np.ndarray, *, too_long: str,
             split: str) -> tuple[list[int], list[str]]:
  """(indices of the samples that fit S+1 tokens, ids of the others).

  Raises:
    ValueError: too_long='error' and a sample does not fit (the first is
      named, with the count).
  """
  limit = source.seq_len + 1
  n = len(source)
  kept = [i for i in range(n) if lengths[i] <= limit]
  skipped = [source.samples[i].id for i in range(n) if lengths[i] > limit]
  if skipped and too_long == 'error':
    i = int(np.argmax(lengths > limit))
    raise ValueError(
        f'{source.where(i)}: {lengths[i]} tokens (an <image> counts '
        f'{source.num_image_tokens}), more than seq_len + 1 = {limit}. Raise '
        f"`seq_len`, or set `too_long`='skip' to drop such samples (counted "
        f'and logged; {len(skipped)} of {n} samples of {source.path} are too '
        'long).')
  if skipped:
    logging.warning('%s (%s): skipped %d of %d samples longer than seq_len + '
                    '1 = %d tokens, e.g. ids %s', source.path, split,
                    len(skipped), n, limit, skipped[:_SHOW_IDS])
  return kept, skipped


def _check_images(source: LlavaSource) -> None:
  """Every image file exists, is an image and has an accepted mode.

  Only the headers are read (PIL decodes pixels on load), about one file
  open per image, so a bad file fails at build time naming its sample
  rather than mid-run in a grain reader thread. A file shared by several
  samples (LLaVA-Instruct's COCO images) is checked once.
  """
  start = time.perf_counter()
  checked = set()
  for i in range(len(source)):
    path = source.image_path(i)
    if path is None or path in checked:
      continue
    images_lib.check_image_file(path,
                                what=f'{source.where(i)}: image {path!r}')
    checked.add(path)
  logging.info('%s: checked %d image files in %.1f s', source.path,
               len(checked), time.perf_counter() - start)


@dataclasses.dataclass(frozen=True)
class _Split:
  """One JSON file's samples, measured, with the over-long ones removed."""

  source: LlavaSource     # the samples that fit S+1 tokens
  lengths: np.ndarray     # [n] int64 tokens of each of them
  skipped: list[str]      # ids of the over-long samples (too_long='skip')


def _read_split(json_path: str | os.PathLike, split: str, *, too_long: str,
                check_images: bool, **source_kw) -> _Split:
  """read_llava_json -> lengths -> the samples that fit (-> image check)."""
  start = time.perf_counter()
  path = os.fspath(json_path)
  source = LlavaSource(read_llava_json(path), path=path, **source_kw)
  lengths = _measure(source)
  kept, skipped = _fitting(source, lengths, too_long=too_long, split=split)
  logging.info('%s: measured %d samples in %.1f s (%d kept)', path,
               len(source), time.perf_counter() - start, len(kept))
  source = source.subset(kept)
  if check_images:
    _check_images(source)
  return _Split(source, lengths[kept], skipped)


def _batches(source: LlavaSource, order_fn, per_epoch: int,
             num_epochs: int | None, *, global_batch_size: int,
             process_index: int, process_count: int) -> grain.MapDataset:
  """Samples in order_fn(epoch) order -> this process's rows of each global
  batch -> model batches (_to_batch) of B = G / P rows."""
  data = OrderedMapDataset(grain.MapDataset.source(source), order_fn,
                           per_epoch, num_epochs)
  data = pipeline_lib.ProcessSliceMapDataset(
      data, global_batch_size, process_index, process_count)
  local = global_batch_size // process_count
  return data.batch(local, drop_remainder=True).map(_to_batch)


def _check_settings(*, template: str, too_long: str, seq_len: int,
                    global_batch_size: int, megabatch_factor: int,
                    process_count: int) -> None:
  """ValueError naming the first bad argument, before any file is read."""
  conversation_lib.check_template(template)
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
    megabatch_factor: int = 1,
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
    megabatch_factor: global batches per length-sorted megabatch (1:
      LLaVA's; see the module docstring).
    add_bos: start each sample with the tokenizer's bos (LLaVA).
    pad_id: id of the right padding (no loss, attention_mask 0).
    check_images: read every image file's header up front (a missing,
      unreadable or unsupported-mode one fails at build time instead of
      mid-run).
    num_epochs: passes over the training samples (None: forever).
    process_index, process_count: default jax.process_index()/count().
    num_threads, prefetch: grain reader threads and read-ahead batches.

  Returns:
    A LlavaPipeline.

  Raises:
    FileNotFoundError: a JSON or (check_images) image file is missing.
    ValueError: bad samples, images or settings; messages name the file and
      sample.
  """
  process_index, process_count = pipeline_lib.resolve_process(process_index,
                                                              process_count)
  _check_settings(template=template, too_long=too_long, seq_len=seq_len,
                  global_batch_size=global_batch_size,
                  megabatch_factor=megabatch_factor,
                  process_count=process_count)
  read = functools.partial(
      _read_split, too_long=too_long, check_images=check_images,
      image_dir=image_dir, tokenizer=tokenizer, spec=spec, template=template,
      seq_len=seq_len, image_token_id=image_token_id,
      num_image_tokens=num_image_tokens, add_bos=add_bos, pad_id=pad_id)
  batches = functools.partial(_batches, global_batch_size=global_batch_size,
                              process_index=process_index,
                              process_count=process_count)

  train = read(train_json, 'train')
  if len(train.source) < global_batch_size:
    raise ValueError(
        f'global_batch_size={global_batch_size}: more than the '
        f'{len(train.source)} training samples of {train.source.path} '
        f'({len(train.skipped)} over-long ones skipped). Add data or lower '
        '`global_batch_size`.')

  def order(epoch: int) -> np.ndarray:
    return length_grouped_order(train.lengths, global_batch=global_batch_size,
                                seed=seed, epoch=epoch,
                                megabatch_factor=megabatch_factor)

  per_epoch = len(train.source) // global_batch_size * global_batch_size
  train_batches = batches(train.source, order, per_epoch, num_epochs)
  num_skipped = {'train': len(train.skipped)}
  skipped_ids = {'train': tuple(train.skipped[:_SHOW_IDS])}

  valid_batches, num_valid = None, 0
  if valid_json is not None:
    valid = read(valid_json, 'valid')
    num_skipped['valid'] = len(valid.skipped)
    skipped_ids['valid'] = tuple(valid.skipped[:_SHOW_IDS])
    # File order, whole global batches only.
    num_valid = min(valid_samples or len(valid.source), len(valid.source))
    num_valid = num_valid // global_batch_size * global_batch_size
    if not num_valid:
      raise ValueError(
          f'valid_json={valid.source.path!r}: {len(valid.source)} usable '
          f'samples (valid_samples={valid_samples}) are fewer than one '
          f'global batch (`global_batch_size`={global_batch_size}).')
    valid_batches = batches(valid.source, lambda epoch: np.arange(num_valid),
                            num_valid, 1)

  return LlavaPipeline(
      train=train_batches, valid=valid_batches, seq_len=seq_len,
      global_batch_size=global_batch_size,
      local_batch_size=global_batch_size // process_count,
      num_train_samples=len(train.source), num_valid_samples=num_valid,
      num_skipped=num_skipped, skipped_ids=skipped_ids,
      image_shape=spec.output_shape,
      vocab_size=getattr(tokenizer, 'vocab_size', None), template=template,
      num_train_tokens=int(train.lengths.sum()), num_threads=num_threads,
      prefetch=prefetch)
