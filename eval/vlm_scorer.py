"""Images and text in, log-likelihoods and greedy answers out: the native
scorer of a LLaVA-style moe_jax VLM (moe_jax/models/llava.py).

What the lmms-eval plugin (eval/lmms/plugin.py) and the tiny shapes task
call. A request is (image, context, continuation) for log-likelihoods and
(image, prompt, max_new_tokens, stop strings) for generation, where the
image is a PIL image, an image file or None (text only) and the context /
prompt is the user's question, before any template.

Encoding (LibMoE / lm-eval's rule: the context and the continuation are
encoded SEPARATELY and concatenated):
  context      -> moe_jax.data.conversation.generation_prompt: the template
                  ('plain' | 'phi35') around the question, '<image>\\n' put
                  in front when there is an image, the tag expanded to
                  num_image_tokens copies of image_token_id, bos first;
  continuation -> tokenizer.encode(continuation) (no special tokens).
The image goes through moe_jax.data.images.preprocess (the tower's HF
processor, + LLaVA's 'pad' aspect when the spec says so); a text-only row
gets a zero image and no image positions (the model ignores it).

How requests become few compiles (as moe_jax.loglikelihood.Scorer):
rows (context + continuation, never truncated: an image's positions cannot
be cut, so an over-long request is an error naming it) are sorted longest
first, cut into batches of `batch_size` rows, each right-padded to the
smallest bucket length (powers of two from `min_bucket`, then max_len) that
holds its longest row; the last batch is filled with padding rows. Right
padding leaves a row's scores unchanged (causal attention, positions from
0); the attention mask marks the real tokens anyway. The batch axis is
sharded over all devices (data parallel).

Generation is greedy with no KV cache: every step re-runs the whole
fixed-shape batch (compile once per bucket; meant for short answers).

Dimension legend: B batch rows, S bucket length (model inputs),
V vocabulary, H, W, C image height, width, channels.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from typing import Any, Mapping, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image
from tqdm import tqdm

from moe_jax import loglikelihood
from moe_jax import restore
from moe_jax import run_log
from moe_jax.data import conversation
from moe_jax.data import images as images_lib
from moe_jax.data import tokenizer as tokenizer_lib
from moe_jax.models import vision

# Padding id of unused columns and rows (never scored; valid everywhere).
_PAD = 0
# The text that ends an assistant turn in each template: generation stops
# there (phi35: the <|end|> token; plain: LLaVA's separator '\n').
TURN_END = {'plain': conversation.PLAIN_SEP, 'phi35': '<|end|>'}

ImageInput = Image.Image | str | os.PathLike | None


@dataclasses.dataclass(frozen=True)
class _Row:
  """One encoded request: ids = context + continuation."""

  ids: np.ndarray          # [n] int32
  num_scored: int          # continuation tokens (the last ones of ids)
  image: int               # index into the call's image arrays, -1: none


def token_scores(params, router_state, step, tokens: jax.Array,
                 images: jax.Array, lengths: jax.Array, *, model
                 ) -> tuple[jax.Array, jax.Array]:
  """tokens [B, S + 1], images [B, H, W, C], lengths [B] (input tokens of
  each row) -> (log p(target) [B, S], argmax [B, S]).

  Position s scores tokens[:, s + 1] given tokens[:, :s + 1] and the image
  (loglikelihood.token_scores with the image and the padding mask).
  """
  mask = (jnp.arange(tokens.shape[1] - 1)[None, :] <
          lengths[:, None]).astype(jnp.int32)                    # [B, S]
  return loglikelihood.token_scores(params, router_state, step, tokens,
                                    model=model, images=images,
                                    attention_mask=mask)


def next_tokens(params, router_state, step, tokens: jax.Array,
                images: jax.Array, last: jax.Array, *, model) -> jax.Array:
  """tokens [B, S], images [B, H, W, C], last [B] -> the argmax after
  tokens[b, :last[b] + 1] [B] (loglikelihood.next_tokens with the image
  and the padding mask)."""
  mask = (jnp.arange(tokens.shape[1])[None, :] <=
          last[:, None]).astype(jnp.int32)                       # [B, S]
  return loglikelihood.next_tokens(params, router_state, step, tokens, last,
                                   model=model, images=images,
                                   attention_mask=mask)


class VLMScorer:
  """Log-likelihoods, greedy answers and multiple-choice accuracy of a VLM.

  Attributes:
    tokenizer: the LLM's tokenizer (moe_jax.data.tokenizer.HFTokenizer).
    image_spec: the tower's preprocessing (images.ImageSpec).
    template: 'plain' | 'phi35' (moe_jax.data.conversation).
    image_token_id, num_image_tokens: `<image>` -> N copies of this id.
    max_len: the longest input row.
    batch_size: rows per batch (a multiple of the device count).
    step: the checkpoint step scored.
  """

  def __init__(self, model, params, router_state, *, tokenizer,
               image_spec: images_lib.ImageSpec, template: str,
               image_token_id: int, num_image_tokens: int, max_len: int,
               batch_size: int = 8, step: int = 0, min_bucket: int = 32,
               add_bos: bool = True, progress: bool = False):
    """
    Args:
      model: the flax Llava module (models.build(config)).
      params, router_state: its variables.
      tokenizer: `encode`, `decode`, `bos_id`, `eos_id` (HFTokenizer).
      image_spec: the tower's ImageSpec.
      template: the conversation template the model was trained with.
      image_token_id: the id whose positions take the image features.
      num_image_tokens: image positions per image (the tower's rows).
      max_len: the longest input row (the training seq_len).
      batch_size: rows per batch; rounded up to a multiple of the devices.
      step: the training step the model sees (routers with schedules).
      min_bucket: the shortest bucket length.
      add_bos: start every prompt with the tokenizer's bos (as training).
      progress: show progress bars (process 0 only).
    """
    if template not in conversation.TEMPLATES:
      raise ValueError(f'template={template!r}: expected one of '
                       f'{conversation.TEMPLATES}')
    devices = jax.devices()
    self.tokenizer = tokenizer
    self.image_spec = image_spec
    self.template = template
    self.image_token_id = int(image_token_id)
    self.num_image_tokens = int(num_image_tokens)
    self.max_len = int(max_len)
    self.batch_size = math.ceil(batch_size / len(devices)) * len(devices)
    self.step = int(step)
    self.add_bos = add_bos
    self.buckets = loglikelihood.bucket_lengths(self.max_len, min_bucket)
    self._progress = progress and jax.process_index() == 0
    self._rows, replicated = loglikelihood.data_parallel_shardings()
    self._variables = jax.device_put((params, router_state, self.step),
                                     replicated)
    self._token_scores = jax.jit(functools.partial(token_scores, model=model))
    self._next_tokens = jax.jit(functools.partial(next_tokens, model=model))

  @classmethod
  def from_workdir(cls, workdir: str, step: int | None = None, *,
                   config: ml_collections.ConfigDict | None = None,
                   batch_size: int = 8, max_len: int | None = None,
                   progress: bool = False) -> 'VLMScorer':
    """A VLM run's checkpoint (default: the newest) with its tokenizer,
    image preprocessing and template, as the run's config.json names them.

    Args:
      workdir: the run directory (configs/vlm/*).
      step: the checkpoint to score.
      config: the run's config (default: its config.json, resolved).
      batch_size: rows per batch.
      max_len: the longest input row (default: config.data.seq_len).
      progress: show progress bars.
    """
    config = (config if config is not None else
              run_log.load_saved_config(workdir))
    if config.get('model_name') != 'llava':
      raise ValueError(f'{workdir}: model_name={config.get("model_name")!r}'
                       "; VLMScorer scores VLM runs (model_name 'llava'); "
                       'use eval.text_scorer.TextScorer for LM runs')
    run = restore.restore_run(config, workdir, step, what='evaluate')
    data = config.data
    tokenizer = tokenizer_lib.load_hf_tokenizer(data.tokenizer)
    spec = dataclasses.replace(
        images_lib.ImageSpec.from_preprocessor_config(data.image_processor),
        aspect=data.image_aspect)
    return cls(run.model, run.params, run.router_state, tokenizer=tokenizer,
               image_spec=spec, template=data.template,
               image_token_id=config.vlm.image_token_id,
               num_image_tokens=vision.num_features(
                   config.vision.kind, config.vision.image_size,
                   config.vision.patch_size, config.vision.feature_select),
               max_len=max_len or data.seq_len, batch_size=batch_size,
               step=run.step, progress=progress)

  # Encoding.

  @property
  def eot_token_id(self) -> int | None:
    return self.tokenizer.eos_id

  def prompt_ids(self, question: str, *, image: bool) -> list[int]:
    """The template's prompt of `question`, bos first and `<image>`
    expanded when `image` (conversation.generation_prompt)."""
    return [int(t) for t in conversation.generation_prompt(
        question, self.tokenizer, self.template,
        image_token_id=self.image_token_id,
        num_image_tokens=self.num_image_tokens, image=image,
        add_bos=self.add_bos)]

  def image_array(self, image: ImageInput, *, sample: Any = None
                  ) -> np.ndarray:
    """A PIL image or an image file -> the tower's input [H, W, C]."""
    if isinstance(image, Image.Image):
      try:
        return images_lib.preprocess(image, self.image_spec)
      except ValueError as e:
        raise ValueError(f'request {sample}: {e}') from e
    if isinstance(image, (str, os.PathLike)):
      return images_lib.load_image(image, self.image_spec, sample=sample)
    raise TypeError(f'request {sample}: image of type {type(image).__name__}'
                    '; expected a PIL image, an image file path or None')

  def _images(self, images: Sequence[ImageInput]
              ) -> tuple[list[int], list[np.ndarray]]:
    """Each request's index into the preprocessed arrays (-1: no image);
    the same object given twice is preprocessed once."""
    index, arrays, seen = [], [], {}
    for i, image in enumerate(images):
      if image is None:
        index.append(-1)
        continue
      key = id(image) if isinstance(image, Image.Image) else os.fspath(image)
      if key not in seen:
        seen[key] = len(arrays)
        arrays.append(self.image_array(image, sample=i))
      index.append(seen[key])
    return index, arrays

  def _bucket(self, length: int) -> int:
    return next(b for b in self.buckets if b >= length)

  def _global(self, array: np.ndarray) -> jax.Array:
    return loglikelihood.to_global_rows(array, self._rows)

  def _host(self, array: jax.Array) -> np.ndarray:
    return loglikelihood.to_host(array)

  def _image_batch(self, rows: Sequence[int], arrays: list[np.ndarray]
                   ) -> np.ndarray:
    """[batch_size, H, W, C]: each row's image, zeros for none / padding."""
    out = np.zeros((self.batch_size, *self.image_spec.output_shape),
                   np.float32)
    for r, k in enumerate(rows):
      if k >= 0:
        out[r] = arrays[k]
    return out

  # Log-likelihoods.

  def loglikelihood(self, requests: Sequence[tuple[ImageInput, str, str]], *,
                    desc: str = 'vlm loglikelihood'
                    ) -> list[tuple[float, bool]]:
    """(logprob, is_greedy) of each (image, context, continuation).

    logprob: the sum of log p over the continuation's tokens; is_greedy:
    every continuation token is the model's argmax (teacher forced).

    Raises:
      ValueError: an empty continuation, or context + continuation longer
        than max_len + 1 tokens (names the request).
    """
    image_index, arrays = self._images([r[0] for r in requests])
    prompts: dict[tuple[str, bool], list[int]] = {}
    rows = []
    for i, (_, context, continuation) in enumerate(requests):
      has_image = image_index[i] >= 0
      key = (context, has_image)
      if key not in prompts:
        prompts[key] = self.prompt_ids(context, image=has_image)
      cont = [int(t) for t in self.tokenizer.encode(continuation)]
      if not cont:
        raise ValueError(f'request {i}: continuation {continuation!r} '
                         f'(after context {context[-60:]!r}) encodes to no '
                         'tokens')
      ids = np.asarray(prompts[key] + cont, np.int32)
      if len(ids) - 1 > self.max_len:
        raise ValueError(
            f'request {i}: {len(prompts[key])} prompt + {len(cont)} '
            f'continuation tokens exceed max_len={self.max_len} + 1 (the '
            'image positions cannot be truncated); shorten the context or '
            'raise max_len')
      rows.append(_Row(ids, len(cont), image_index[i]))
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i].ids))
    out: list[tuple[float, bool]] = [(0.0, False)] * len(rows)
    started, shapes = time.perf_counter(), set()
    with tqdm(total=len(rows), desc=desc, unit='req',
              disable=not self._progress) as bar:
      for first in range(0, len(order), self.batch_size):
        batch = order[first:first + self.batch_size]
        length = self._bucket(len(rows[batch[0]].ids) - 1)
        shapes.add(length)
        tokens = np.full((self.batch_size, length + 1), _PAD, np.int32)
        # Padding rows: one real column (no all-masked attention rows).
        lengths = np.ones(self.batch_size, np.int32)
        for r, i in enumerate(batch):
          tokens[r, :len(rows[i].ids)] = rows[i].ids
          lengths[r] = len(rows[i].ids) - 1
        images = self._image_batch([rows[i].image for i in batch], arrays)
        target_lp, greedy = self._token_scores(
            *self._variables, self._global(tokens), self._global(images),
            self._global(lengths))
        target_lp, greedy = self._host(target_lp), self._host(greedy)
        for r, i in enumerate(batch):
          row = rows[i]
          end = len(row.ids) - 1              # targets are ids[1:end + 1]
          cont = slice(end - row.num_scored, end)
          out[i] = (float(target_lp[r, cont].sum()),
                    bool(np.all(greedy[r, cont] == row.ids[1:][cont])))
        bar.update(len(batch))
    logging.info('%s: %d requests in %d batches of %d, %d shapes, %.1f s',
                 desc, len(rows), math.ceil(len(rows) / self.batch_size),
                 self.batch_size, len(shapes), time.perf_counter() - started)
    return out

  # Generation.

  def generate(self, requests: Sequence[tuple[ImageInput, str, int,
                                              Sequence[str]]], *,
               desc: str = 'vlm generate') -> list[str]:
    """Greedy answer of each (image, prompt, max_new_tokens, stop strings).

    A row stops at the tokenizer's eos, at the template's end of turn
    (TURN_END) or once its text holds a stop string; the text is cut before
    the first of these. max_new_tokens is cut to what fits in max_len.

    Raises:
      ValueError: max_new_tokens < 1, or a prompt that leaves no room to
        generate (names the request).
    """
    image_index, arrays = self._images([r[0] for r in requests])
    prompts, budgets, stops = [], [], []
    for i, (_, prompt, max_new_tokens, until) in enumerate(requests):
      if int(max_new_tokens) < 1:
        raise ValueError(f'request {i}: max_new_tokens={max_new_tokens}: '
                         'expected at least 1')
      ids = self.prompt_ids(prompt, image=image_index[i] >= 0)
      room = self.max_len - len(ids)
      if room < 1:
        raise ValueError(f'request {i}: the prompt has {len(ids)} tokens, '
                         f'max_len={self.max_len} leaves no room to generate')
      prompts.append(ids)
      budgets.append(min(int(max_new_tokens), room))
      stops.append(tuple(s for s in (*until, TURN_END[self.template]) if s))
    eos = self.eot_token_id
    order = sorted(range(len(prompts)),
                   key=lambda i: -(len(prompts[i]) + budgets[i]))
    generated: list[list[int]] = [[] for _ in prompts]
    with tqdm(total=len(prompts), desc=desc, unit='req',
              disable=not self._progress) as bar:
      for first in range(0, len(order), self.batch_size):
        batch = order[first:first + self.batch_size]
        length = self._bucket(len(prompts[batch[0]]) + budgets[batch[0]])
        tokens = np.full((self.batch_size, length), _PAD, np.int32)
        last = np.zeros(self.batch_size, np.int32)
        for r, i in enumerate(batch):
          tokens[r, :len(prompts[i])] = prompts[i]
          last[r] = len(prompts[i]) - 1
        images = self._global(self._image_batch(
            [image_index[i] for i in batch], arrays))
        live = set(range(len(batch)))
        for _ in range(max(budgets[i] for i in batch)):
          new = self._host(self._next_tokens(
              *self._variables, self._global(tokens), images,
              self._global(last)))
          for r in sorted(live):
            i = batch[r]
            generated[i].append(int(new[r]))
            last[r] += 1
            tokens[r, last[r]] = new[r]
            if (int(new[r]) == eos or len(generated[i]) >= budgets[i] or
                any(s in self.tokenizer.decode(generated[i])
                    for s in stops[i])):
              live.discard(r)
          if not live:
            break
        bar.update(len(batch))
    out = []
    for ids, until in zip(generated, stops):
      if ids and ids[-1] == eos:
        ids = ids[:-1]
      text = self.tokenizer.decode(ids)
      cuts = [text.index(s) for s in until if s in text]
      out.append(text[:min(cuts)] if cuts else text)
    return out

  # Multiple choice.

  def choice_logprobs(self, items: Sequence[Mapping[str, Any]], *,
                      image_dir: str | os.PathLike | None = None
                      ) -> list[list[float]]:
    """The summed log p of each option of each multiple-choice item.

    Args:
      items: {'image': PIL image | file path (relative to image_dir) | None,
        'question': str, 'options': [str, ...], 'answer': the option's text
        or index} (the shapes set's eval.jsonl rows,
        moe_jax/data/tiny_vlm.py).
      image_dir: the folder relative image paths are in.
    """
    requests, owner = [], []
    for k, item in enumerate(items):
      image = item.get('image')
      if isinstance(image, (str, os.PathLike)) and image_dir is not None:
        image = os.path.join(image_dir, image)
      options = item.get('options')
      if not options:
        raise ValueError(f'item {k}: no options (expected a non-empty list '
                         "under 'options')")
      for option in options:
        requests.append((image, item['question'], option))
        owner.append(k)
    lls: list[list[float]] = [[] for _ in items]
    for k, (logprob, _) in zip(owner, self.loglikelihood(
        requests, desc='vlm choices')):
      lls[k].append(logprob)
    return lls

  def score_choices(self, items: Sequence[Mapping[str, Any]], *,
                    image_dir: str | os.PathLike | None = None) -> float:
    """Accuracy on multiple-choice items: the option with the highest
    summed log-probability (the first of equal ones) is the answer
    (lm-eval's `acc`; eval/lmms_tasks/shapes uses the same rule)."""
    if not items:
      raise ValueError('items: expected at least one multiple-choice item')
    lls = self.choice_logprobs(items, image_dir=image_dir)
    correct = [int(np.argmax(l)) == answer_index(item, k)
               for k, (l, item) in enumerate(zip(lls, items))]
    return float(np.mean(correct))


def answer_index(item: Mapping[str, Any], k: int = 0) -> int:
  """The index of an item's answer in its options ('answer' is the
  option's text, as in the shapes set, or its index)."""
  answer, options = item.get('answer'), list(item.get('options') or ())
  if isinstance(answer, (int, np.integer)) and not isinstance(answer, bool):
    index = int(answer)
  elif answer in options:
    index = options.index(answer)
  else:
    raise ValueError(f'item {k} ({item.get("id", "no id")}): answer '
                     f'{answer!r} is not one of the options {options}')
  if not 0 <= index < len(options):
    raise ValueError(f'item {k} ({item.get("id", "no id")}): answer index '
                     f'{index} out of range for {len(options)} options')
  return index


def read_items(path: str | os.PathLike) -> list[dict[str, Any]]:
  """The multiple-choice items of a jsonl file (one JSON object a line)."""
  items = []
  with open(path, encoding='utf-8') as f:
    for n, line in enumerate(f, 1):
      if line.strip():
        try:
          items.append(json.loads(line))
        except ValueError as e:
          raise ValueError(f'{path}:{n}: not a JSON object ({e})') from e
  return items
