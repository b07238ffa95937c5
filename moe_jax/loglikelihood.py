"""Batched log-likelihood of continuations, and greedy decoding.

The scorer behind zero-shot evaluation (eval/), the lm-eval adapter and any
analysis that asks "how likely is this text under the checkpoint". It works
on token ids, so it serves models trained from scratch (SentencePiece) and
imported Hugging Face models (their tokenizer) alike; eval/text_scorer.py
adds the tokenizer.

How requests become few compiles:
  1. Each request (context ids, continuation ids) becomes one row: the last
     max_len + 1 tokens of context + continuation (left truncation: the
     continuation is kept, the context's start is dropped), input = row[:-1],
     target = row[1:]. Each request is truncated on its own: requests that
     share a context but differ in continuation length keep different
     amounts of it (a caveat for the 'sum' rule, eval/multiple_choice.py).
  2. Identical requests are scored once.
  3. Rows are sorted longest first (a too-large batch fails on the first
     batch, not the last) and cut into batches of `batch_size` rows.
  4. Each batch is right-padded to the smallest bucket length that holds
     its longest row (powers of two from `min_bucket` to max_len), so a
     whole evaluation compiles at most log2(max_len / min_bucket) + 1
     shapes. The last batch is filled with padding rows.
Right padding needs no attention mask: attention is causal and positions
start at 0 in the first column, so a row's scores do not depend on what
follows it, nor on the other rows of the batch: the layer's routing is per
token, and the Scorer makes every MoE layer dropless (`dropless_model`
clears moe.capacity_factor: with a capacity, the padding and the other rows
would compete for expert slots and a row's score would depend on its
batch). The parameters are the same with or without a capacity factor.

The batch axis is sharded over every device of every process (data
parallel); each process holds the same request list and gets every result.

Dimension legend: B batch rows, S bucket length (model inputs), V vocabulary.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Any, Callable, Mapping, Sequence

from absl import logging
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from moe_jax import scoring

# Padding id of the unused columns and rows; any valid id works (it is never
# scored), 0 is valid in every vocabulary.
_PAD = 0


@dataclasses.dataclass(frozen=True)
class Request:
  """Token ids of a context and the continuation to score after it."""

  context: tuple[int, ...]
  continuation: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Score:
  """The model's judgement of one Request's continuation."""

  # Sum of log p(token) over the continuation tokens.
  logprob: float
  # Continuation tokens scored (fewer than given only when the continuation
  # alone is longer than max_len).
  num_tokens: int
  # Every continuation token is the model's argmax (teacher forced).
  is_greedy: bool
  # The argmax token at each continuation position (teacher forced).
  greedy_tokens: tuple[int, ...]
  # Sum of log p over the context tokens that were predicted (the first
  # token of the window has no prediction).
  context_logprob: float


# The MoEBlock field (and config.moe key) of the GShard capacity factor.
_CAPACITY = 'capacity_factor'


def _dropless_value(value: Any) -> Any:
  """`value` with every non-None 'capacity_factor' key of its (nested)
  mappings set to None; `value` itself when there is none."""
  if not isinstance(value, Mapping):
    return value
  out, changed = {}, False
  for key, item in value.items():
    if key == _CAPACITY and item is not None:
      out[key], changed = None, True
    else:
      out[key] = _dropless_value(item)
      changed = changed or out[key] is not item
  return out if changed else value


def dropless_model(model):
  """The flax model with every MoE layer dropless (capacity_factor None).

  A capacity factor (moe.capacity_factor) caps the tokens each expert takes
  per forward pass, so in a padded batch a row's outputs would depend on
  the padding and on the other rows. Scoring runs the same parameters
  without it: the capacity_factor field of the module itself (a MoEBlock)
  and any 'capacity_factor' key of its mapping fields (TransformerLM.ffn,
  Llava.moe and Llava.llm['ffn']) become None. Returns `model` itself when
  it has no capacity factor.
  """
  if not dataclasses.is_dataclass(model):
    return model
  updates = {}
  for field in dataclasses.fields(model):
    if field.name in ('parent', 'name') or not hasattr(model, field.name):
      continue
    value = getattr(model, field.name)
    if field.name == _CAPACITY:
      if value is not None:
        updates[field.name] = None
      continue
    new = _dropless_value(value)
    if new is not value:
      updates[field.name] = new
  if not updates:
    return model
  logging.info('Scorer: scoring with capacity_factor=None (dropless) '
               'instead of the model\'s capacity factor, so that scores do '
               'not depend on the batch')
  return model.clone(**updates)


def bucket_lengths(max_len: int, min_bucket: int = 32) -> tuple[int, ...]:
  """Input lengths the scorer compiles for: powers of two, then max_len."""
  if max_len < 1:
    raise ValueError(f'max_len={max_len}: expected a positive context length')
  out, length = [], min(min_bucket, max_len)
  while length < max_len:
    out.append(length)
    length *= 2
  return tuple(out) + (max_len,)


def _window(request: Request, max_len: int) -> tuple[np.ndarray, int]:
  """The request's row (at most max_len + 1 ids) and its continuation
  length within the row."""
  if not request.continuation:
    raise ValueError('a Request needs at least one continuation token')
  tokens = (request.context + request.continuation)[-(max_len + 1):]
  if len(tokens) < 2:
    raise ValueError('a Request needs at least two tokens in all (a '
                     'context token to predict the first continuation '
                     'token from); prepend a document-start prefix')
  return (np.asarray(tokens, np.int32),
          min(len(request.continuation), len(tokens) - 1))


def token_scores(params, router_state, step, tokens: jax.Array, *, model,
                 **model_inputs) -> tuple[jax.Array, jax.Array]:
  """tokens [B, S + 1] -> (log p(target) [B, S], argmax [B, S]).

  Position s scores tokens[:, s + 1] given tokens[:, :s + 1].
  model_inputs: the model's other inputs by name, passed to its apply (VLM:
  images [B, H, W, C], attention_mask [B, S]; eval/vlm_scorer.py).
  """
  inputs, targets = tokens[:, :-1], tokens[:, 1:]
  logits, _ = scoring.apply_model(model, params, router_state, inputs,
                                  train=False, step=step, **model_inputs)
  logits = logits.astype(jnp.float32)                            # [B, S, V]
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  target_lp = jnp.take_along_axis(log_probs, targets[..., None], -1)[..., 0]
  return target_lp, jnp.argmax(logits, axis=-1).astype(jnp.int32)


def next_tokens(params, router_state, step, tokens: jax.Array,
                last: jax.Array, *, model, **model_inputs) -> jax.Array:
  """tokens [B, S], last [B] -> the argmax after tokens[b, :last[b] + 1].

  model_inputs: the model's other inputs by name (as token_scores).
  """
  logits, _ = scoring.apply_model(model, params, router_state, tokens,
                                  train=False, step=step, **model_inputs)
  at_last = jnp.take_along_axis(logits, last[:, None, None], axis=1)[:, 0]
  return jnp.argmax(at_last, axis=-1).astype(jnp.int32)          # [B]


def data_parallel_shardings() -> tuple[jax.sharding.NamedSharding,
                                       jax.sharding.NamedSharding]:
  """(rows split over every device of every process, replicated), on a 1-D
  'data' mesh: how the scorers lay out their batches and variables."""
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ('data',))
  return (jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data')),
          jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))


def to_global_rows(array: np.ndarray,
                   rows: jax.sharding.NamedSharding) -> jax.Array:
  """A host array every process holds whole -> its rows over all devices."""
  return jax.make_array_from_callback(array.shape, rows,
                                      lambda index: array[index])


def to_host(array: jax.Array) -> np.ndarray:
  """A (row-sharded) result, whole on every process."""
  if jax.process_count() > 1:
    return np.asarray(multihost_utils.process_allgather(array, tiled=True))
  return np.asarray(array)


class Scorer:
  """Log-likelihoods and greedy continuations of a model's variables.

  Attributes:
    max_len: the model's context length (longest input row).
    batch_size: rows per batch (a multiple of the device count).
  """

  def __init__(self, model, params, router_state, *, step: int = 0,
               max_len: int, batch_size: int = 32, min_bucket: int = 32,
               progress: bool = True):
    """
    Args:
      model: the flax module (models.build(config)); scored dropless
        (dropless_model: a moe.capacity_factor is ignored).
      params, router_state: its variables (e.g. restore.restore_run's).
      step: the training step the model sees (routers with schedules).
      max_len: the longest input row; longer requests are left-truncated.
      batch_size: rows per batch; rounded up to a multiple of the number of
        devices, over which the batch is sharded.
      min_bucket: the shortest bucket length.
      progress: show a progress bar (process 0 only).
    """
    devices = jax.devices()
    self.max_len = int(max_len)
    self.batch_size = math.ceil(batch_size / len(devices)) * len(devices)
    self.buckets = bucket_lengths(self.max_len, min_bucket)
    self._progress = progress and jax.process_index() == 0
    self._rows, self._replicated = data_parallel_shardings()
    self.set_variables(params, router_state, step)
    # Dropless, so that a row's score does not depend on its batch.
    self.model = model = dropless_model(model)
    self._token_scores = jax.jit(functools.partial(token_scores, model=model))
    self._next_tokens = jax.jit(functools.partial(next_tokens, model=model))

  def set_variables(self, params, router_state, step: int = 0) -> None:
    """Scores with new variables of the same model (e.g. during training),
    reusing the compiled functions."""
    variables = (params, router_state, step)
    if jax.process_count() == 1:
      self._variables = jax.device_put(variables, self._replicated)
      return

    def replicate(leaf):
      if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
        # A global array (e.g. FSDP-sharded training state): reshard.
        return jax.device_put(leaf, self._replicated)
      # This process's whole copy (a restored checkpoint on a local
      # device): the global array's shards come from host memory.
      host = np.asarray(leaf)
      return jax.make_array_from_callback(host.shape, self._replicated,
                                          lambda index: host[index])

    self._variables = jax.tree.map(replicate, variables)

  def _bucket(self, length: int) -> int:
    return next(b for b in self.buckets if b >= length)

  def _global(self, array: np.ndarray) -> jax.Array:
    return to_global_rows(array, self._rows)

  def _host(self, array: jax.Array) -> np.ndarray:
    return to_host(array)

  def loglikelihood(self, requests: Sequence[Request], *,
                    desc: str = 'scoring') -> list[Score]:
    """One Score per request, in the order given."""
    unique = list(dict.fromkeys(requests))
    windows = [_window(r, self.max_len) for r in unique]
    order = sorted(range(len(unique)), key=lambda i: -len(windows[i][0]))
    scores: dict[Request, Score] = {}
    started, shapes = time.perf_counter(), set()
    with tqdm(total=len(unique), desc=desc, unit='req', smoothing=0.1,
              disable=not self._progress) as bar:
      for first in range(0, len(order), self.batch_size):
        batch = order[first:first + self.batch_size]
        length = self._bucket(len(windows[batch[0]][0]) - 1)
        shapes.add(length)
        tokens = np.full((self.batch_size, length + 1), _PAD, np.int32)
        for row, i in enumerate(batch):
          ids = windows[i][0]
          tokens[row, :len(ids)] = ids
        target_lp, greedy = self._token_scores(*self._variables,
                                               self._global(tokens))
        target_lp, greedy = self._host(target_lp), self._host(greedy)
        for row, i in enumerate(batch):
          ids, n_cont = windows[i]
          end = len(ids) - 1                   # targets are ids[1:end + 1]
          cont = slice(end - n_cont, end)
          scores[unique[i]] = Score(
              logprob=float(target_lp[row, cont].sum()),
              num_tokens=n_cont,
              is_greedy=bool(np.all(greedy[row, cont] == ids[1:][cont])),
              greedy_tokens=tuple(int(t) for t in greedy[row, cont]),
              context_logprob=float(target_lp[row, :end - n_cont].sum()))
        bar.update(len(batch))
    seconds = time.perf_counter() - started
    logging.info('%s: %d requests (%d distinct) in %d batches of %d, %d '
                 'shapes, %.1f s, %.1f requests/s', desc, len(requests),
                 len(unique), math.ceil(len(unique) / self.batch_size),
                 self.batch_size, len(shapes), seconds,
                 len(requests) / max(seconds, 1e-9))
    return [scores[r] for r in requests]

  def generate(self, contexts: Sequence[Sequence[int]], *,
               max_new_tokens: int,
               stop: Callable[[list[int]], bool] | None = None,
               desc: str = 'generating') -> list[list[int]]:
    """Greedy continuations of each context, at most max_new_tokens long.

    Every step re-runs the model on the whole fixed-shape batch (no KV
    cache): simple and compile-once per bucket, meant for short answers.

    Args:
      contexts: token ids; each is left-truncated to leave room for
        max_new_tokens within max_len.
      max_new_tokens: the most tokens generated per context.
      stop: called with a row's generated ids after each step; True ends
        that row (e.g. an end-of-text id or a stop string was produced).

    Returns:
      The generated ids of each context (the stopping token included).
    """
    if not 0 < max_new_tokens < self.max_len:
      raise ValueError(f'max_new_tokens={max_new_tokens}: expected 1 to '
                       f'{self.max_len - 1} (the context length)')
    room = self.max_len - max_new_tokens
    prompts = [list(c)[-room:] for c in contexts]
    if any(not p for p in prompts):
      raise ValueError('every context needs at least one token')
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out: list[list[int]] = [[] for _ in prompts]
    with tqdm(total=len(prompts), desc=desc, unit='req',
              disable=not self._progress) as bar:
      for first in range(0, len(order), self.batch_size):
        batch = order[first:first + self.batch_size]
        length = self._bucket(len(prompts[batch[0]]) + max_new_tokens)
        tokens = np.full((self.batch_size, length), _PAD, np.int32)
        last = np.zeros(self.batch_size, np.int32)
        for row, i in enumerate(batch):
          tokens[row, :len(prompts[i])] = prompts[i]
          last[row] = len(prompts[i]) - 1
        live = set(range(len(batch)))
        for _ in range(max_new_tokens):
          new = self._host(self._next_tokens(
              *self._variables, self._global(tokens), self._global(last)))
          for row in sorted(live):
            generated = out[batch[row]]
            generated.append(int(new[row]))
            last[row] += 1
            tokens[row, last[row]] = new[row]
            if stop is not None and stop(generated):
              live.discard(row)
          if not live:
            break
        bar.update(len(batch))
    return out
