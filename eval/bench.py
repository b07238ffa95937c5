"""Benchmark: zero-shot scoring speed, and the time to score all nine tasks.

  python -m eval.bench [--config=configs/smoe_154m.py:tiny] [--batch_size=32]
      [--repeats=5] [--data_dir=../shared/data/lm_eval]
      [--tokenizer=runs/<run>/tokenizer_bpe512.model] [--max_requests=N]
      [--mfu=0.3] [--json=PATH]

Three parts, printed in this order:

1. Measured speed. The --config model, randomly initialised (no checkpoint),
   is scored by moe_jax.loglikelihood.Scorer at the config's seq_len on
   synthetic requests that fill the Scorer's buckets: each batch of
   `batch_size` rows has its row lengths drawn uniformly inside one bucket,
   the batches spread over every bucket. One warm-up call compiles every
   shape; the figures are the median of --repeats timed calls (compile time
   = warm-up seconds - median, reported apart). Reported: requests/s,
   tokens/s (model input positions, padding excluded), padded tokens/s and
   the achieved FLOP/s (forward FLOPs of the padded batches, below).
2. Workload. Every task folder present under --data_dir is read with the
   task readers of eval/tasks (no model); its distinct (context,
   continuation) pairs are what the Scorer runs. Each pair's row is the
   document-start prefix + the context's tokens + the continuation's
   (encoded separately, as eval/text_scorer.py does), counted with
   --tokenizer or estimated as ceil(chars / 4) without one. Per task:
   requests, tokens = sum of min(row - 1, seq_len) (the model's input
   positions; min(len(ctx) + len(cont), seq_len) with a 1-token prefix),
   and the padded tokens of the Scorer's batches (sorted longest first, cut
   into batches of batch_size rows, each padded to its bucket). HellaSwag
   and CBT have no offline copy: their published sizes are used (HellaSwag
   validation 10,042 items x 4 endings; CBT test 4 x 2,500 items x 10
   candidates) with assumed lengths (ESTIMATES: a mean in characters,
   converted at the loaded tasks' chars per token, spread evenly over
   0.5-1.5x the mean). A task whose folder is missing falls back the same
   way, with the mean lengths of the offline copy.
3. Projection, for the --projection_config model (LibMoE's 154M SMoE): the
   forward FLOPs of the padded batches, each padded token costing
   moe_jax.flops.train_flops_per_token / 3 at its bucket length S (PaLM's
   6 N + 12 L H Dh S is three forward passes: 2 N + 4 L H Dh S), divided by
   an H100's bf16 dense peak (moe_jax.flops.PEAK_BF16_FLOPS) at an ASSUMED
   MFU (--mfu), against the 10-minute target; beside it the time this
   machine would take at the achieved FLOP/s of part 1, and the time the
   timed model itself would take at its own seq_len. The projection counts
   FLOPs only: the Scorer's per-batch host work (building the batch,
   copying [B, S] scores back, one Score per row) is not in it; the
   number of batches is printed so that it can be judged.

On 2 CPU cores the 154M model runs at ~6 GFLOP/s in its bfloat16 (~2
minutes per 8-row batch at bucket 1024) and ~80 GFLOP/s in float32; bound
it with e.g. `--config=configs/smoe_154m.py --batch_size=4 --repeats=1
--dtype=float32` (~30 s).

The last lines are `key=value` figures (requests_per_s, tokens_per_s,
compile_s, h100_minutes, cpu_minutes, ...); --json writes every figure.

Dimension legend: R requests (rows), B batch rows, S bucket length.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import statistics
import sys
import time
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from eval import tasks as tasks_lib
from eval import text_scorer as text_scorer_lib
from moe_jax import config_lib
from moe_jax import flops as flops_lib
from moe_jax import loglikelihood
from moe_jax import models
from moe_jax import state as state_lib
from moe_jax.data import tokenizer as tokenizer_lib

# Characters per token when no tokenizer is given (a common rule of thumb
# for English BPE vocabularies; an estimate).
CHARS_PER_TOKEN = 4.0
# The device the projection is for, and the evaluation-time target.
TARGET_DEVICE = 'H100'
TARGET_MINUTES = 10.0
# Requests the Scorer's first bucket starts at (loglikelihood.Scorer default).
MIN_BUCKET = 32

# An estimated task's request lengths (context + continuation tokens) run
# evenly from ESTIMATE_SPREAD[0] to [1] times its mean (an assumption).
ESTIMATE_SPREAD = (0.5, 1.5)

# texts -> their token counts, aligned.
CountFn = Callable[[Sequence[str]], list[int]]


@dataclasses.dataclass(frozen=True)
class SizeEstimate:
  """A task's size and per-request length when its files are not at hand."""
  requests: int        # (context, continuation) pairs
  context_chars: int   # characters of one request's context
  option_chars: int    # characters of one continuation
  basis: str           # where the numbers come from


ESTIMATES: dict[str, SizeEstimate] = {
    # No offline copy: published sizes, ASSUMED lengths.
    'hellaswag': SizeEstimate(
        10_042 * 4, 280, 110,
        'HellaSwag validation: 10,042 items x 4 endings (published size); '
        'context ~280 chars, ending ~110 chars (assumed)'),
    'cbt': SizeEstimate(
        4 * 2_500 * 10, 2_200, 60,
        'CBT test: 4 word types x 2,500 items x 10 candidates (published '
        'size); 20-sentence context + query ~2,200 chars, candidate + rest '
        'of the query ~60 chars (assumed)'),
    # Fallbacks for a missing folder: pairs and mean lengths of the offline
    # copies in ../shared/data/lm_eval (measured with eval/tasks readers).
    'lambada': SizeEstimate(5_153, 316, 7, 'LAMBADA test: 5,153 passages; '
                            'mean of the offline copy'),
    'blimp': SizeEstimate(134_000, 0, 47, 'BLiMP: 67 x 1,000 pairs x 2 '
                          'sentences; mean of the offline copy'),
    'piqa': SizeEstimate(3_676, 54, 99, 'PIQA validation: 1,838 x 2; mean of '
                         'the offline copy'),
    'arc': SizeEstimate(14_148, 138, 26, 'ARC test: 3,537 x 4; mean of the '
                        'offline copy'),
    'race': SizeEstimate(19_736, 1_628, 32, 'RACE test: 4,934 x 4; mean of '
                         'the offline copy'),
    'siqa': SizeEstimate(5_862, 136, 19, 'SIQA dev: 1,954 x 3; mean of the '
                         'offline copy'),
    'commonsenseqa': SizeEstimate(6_105, 86, 9, 'CSQA dev: 1,221 x 5; mean of '
                                  'the offline copy'),
}


# --- workload -----------------------------------------------------------


def estimated_counts(texts: Sequence[str]) -> list[int]:
  """ceil(chars / CHARS_PER_TOKEN) per text (0 for '')."""
  return [math.ceil(len(t) / CHARS_PER_TOKEN) for t in texts]


def tokenizer_counts(tokenizer) -> CountFn:
  """The CountFn of a tokenizer (encode_batch of the distinct texts)."""
  def count(texts: Sequence[str]) -> list[int]:
    nonempty = [t for t in texts if t]
    ids = dict(zip(nonempty, tokenizer.encode_batch(nonempty))) if nonempty \
        else {}
    return [len(ids[t]) if t else 0 for t in texts]
  return count


def task_pairs(items: Sequence[Any]) -> list[tuple[str, str]]:
  """The (context, continuation) pairs a task sends to the scorer, in order:
  every option of a multiple-choice Item, a LAMBADA item's ' ' + word."""
  pairs = []
  for item in items:
    options = getattr(item, 'options', None)
    if options is None:                              # eval.lambada.LambadaItem
      options = (item.continuation,)
    pairs.extend((item.context, option) for option in options)
  return pairs


@dataclasses.dataclass
class TaskWorkload:
  """The rows one task's scoring runs."""
  name: str
  display: str
  pairs: int               # (context, continuation) pairs the task sends
  rows: np.ndarray         # [R] tokens of each distinct pair's row
  chars: int               # characters of the distinct texts (0: estimated)
  text_tokens: int         # their tokens (0: estimated)
  source: str              # 'data' or the estimate's basis

  @property
  def requests(self) -> int:
    """Distinct pairs: what the Scorer runs (it scores duplicates once)."""
    return len(self.rows)


def row_lengths(pairs: Sequence[tuple[str, str]], count: CountFn,
                prefix_len: int) -> tuple[np.ndarray, int, int]:
  """Tokens of each distinct pair's row, and the chars and tokens of the
  distinct texts.

  Args:
    pairs: (context, continuation) strings.
    count: the token counter.
    prefix_len: tokens of the document-start prefix before every context.

  Returns:
    (rows [R] = prefix_len + tokens(context) + tokens(continuation) for the
    R distinct pairs in first-seen order, total chars, total tokens).
  """
  unique = list(dict.fromkeys(pairs))
  texts = sorted({t for pair in unique for t in pair})
  tokens = dict(zip(texts, count(texts)))
  rows = np.asarray([prefix_len + tokens[c] + tokens[o] for c, o in unique],
                    np.int64)
  return rows, sum(map(len, texts)), sum(tokens.values())


def estimated_task(name: str, prefix_len: int, chars_per_token: float
                   ) -> TaskWorkload:
  """A task of ESTIMATES, its request lengths spread evenly over ESTIMATE_SPREAD
  times the estimated mean (one length would put every request on one side
  of a bucket boundary)."""
  est = ESTIMATES[name]
  mean = (math.ceil(est.context_chars / chars_per_token)
          + max(1, math.ceil(est.option_chars / chars_per_token)))
  low, high = ESTIMATE_SPREAD
  scale = low + (high - low) * (np.arange(est.requests) + 0.5) / est.requests
  rows = prefix_len + np.maximum(1, np.round(mean * scale)).astype(np.int64)
  return TaskWorkload(name=name, display=tasks_lib.TASKS[name].display,
                      pairs=est.requests, rows=rows, chars=0, text_tokens=0,
                      source=est.basis)


def measured_chars_per_token(workloads: Sequence[TaskWorkload] | Any, *,
                             tokenized: bool) -> float:
  """Characters per token over the read tasks' distinct texts when a
  tokenizer counted them, else CHARS_PER_TOKEN."""
  read = [w for w in workloads if w.source == 'data']
  chars = sum(w.chars for w in read)
  tokens = sum(w.text_tokens for w in read)
  return chars / tokens if tokenized and tokens else CHARS_PER_TOKEN


def task_workloads(data_dir: str, count: CountFn, prefix_len: int, *,
                   names: Sequence[str] = tuple(tasks_lib.TASKS),
                   chars_per_token: float | None = None
                   ) -> list[TaskWorkload]:
  """The rows of each task: read from data_dir, else from ESTIMATES.

  Args:
    data_dir: the folder of task folders (config.eval.data_dir).
    count: the token counter.
    prefix_len: tokens of the document-start prefix.
    names: the tasks, in canonical order.
    chars_per_token: for estimated tasks; default: the ratio over the read
      tasks' texts when a tokenizer counted them (count is not
      estimated_counts), else CHARS_PER_TOKEN.

  Returns:
    One TaskWorkload per name, in order.
  """
  read: dict[str, TaskWorkload] = {}
  for name in names:
    spec = tasks_lib.TASKS[name]
    folder = os.path.join(data_dir, spec.subdir)
    if not os.path.isdir(folder):
      continue
    pairs = task_pairs(spec.load(folder))
    rows, chars, tokens = row_lengths(pairs, count, prefix_len)
    read[name] = TaskWorkload(name=name, display=spec.display,
                              pairs=len(pairs), rows=rows, chars=chars,
                              text_tokens=tokens, source='data')
  if chars_per_token is None:
    chars_per_token = measured_chars_per_token(
        read.values(), tokenized=count is not estimated_counts)
  return [read[name] if name in read else
          estimated_task(name, prefix_len, chars_per_token) for name in names]


@dataclasses.dataclass(frozen=True)
class Packing:
  """The Scorer's batches of some rows (loglikelihood.Scorer.loglikelihood)."""
  requests: int
  tokens: int                   # model input positions, padding excluded
  padded_tokens: int            # batch_size x bucket, summed over batches
  batches: dict[int, int]       # bucket length -> batches

  def flops(self, config: ml_collections.ConfigDict, batch_size: int
            ) -> float:
    """Forward FLOPs of every padded batch under `config`'s model."""
    return sum(n * batch_size * length * forward_flops_per_token(config,
                                                                 length)
               for length, n in self.batches.items())


def pack(rows: np.ndarray, *, max_len: int, batch_size: int,
         min_bucket: int = MIN_BUCKET) -> Packing:
  """Batches rows [R] (tokens per request) the way the Scorer does.

  A row is left-truncated to max_len + 1 tokens and its input is all but
  the last: min(row, max_len + 1) - 1 positions. Rows are sorted longest
  first and cut into batches of batch_size; each batch is padded to the
  smallest bucket (loglikelihood.bucket_lengths) that holds its longest
  row, the last batch with padding rows too.
  """
  buckets = loglikelihood.bucket_lengths(max_len, min_bucket)
  inputs = np.sort(np.minimum(np.asarray(rows), max_len + 1) - 1)[::-1]
  batches: dict[int, int] = {}
  for first in range(0, len(inputs), batch_size):
    longest = int(inputs[first])
    length = next(b for b in buckets if b >= longest)
    batches[length] = batches.get(length, 0) + 1
  return Packing(requests=len(inputs), tokens=int(inputs.sum()),
                 padded_tokens=sum(batch_size * b * n
                                   for b, n in batches.items()),
                 batches=dict(sorted(batches.items())))


def forward_flops_per_token(config: ml_collections.ConfigDict, length: int
                            ) -> float:
  """Forward FLOPs per token at input length `length`: a third of
  moe_jax.flops.train_flops_per_token (2 N_active + 4 L H Dh S)."""
  at_length = config.copy_and_resolve_references()
  at_length.train.seq_len = int(length)
  return flops_lib.train_flops_per_token(at_length) / 3.0


# --- timing -------------------------------------------------------------


def build_scorer(config: ml_collections.ConfigDict, *, batch_size: int,
                 seed: int = 0) -> loglikelihood.Scorer:
  """A Scorer of the config's model with random variables, at
  config.data.seq_len."""
  model = models.build(config)
  init = jax.jit(functools.partial(state_lib.init_variables, model=model,
                                   seq_len=config.data.seq_len))
  variables = nn.unbox(init(jax.random.key(seed)))
  return loglikelihood.Scorer(
      model, variables['params'], dict(variables.get('router_state', {})),
      max_len=config.data.seq_len, batch_size=batch_size, progress=False)


def synthetic_requests(num_batches: int, batch_size: int, *, max_len: int,
                       vocab_size: int, seed: int = 0
                       ) -> list[loglikelihood.Request]:
  """num_batches x batch_size distinct requests that fill the buckets.

  Batch j takes bucket j modulo the bucket count (with fewer batches than
  buckets, evenly spaced buckets from the shortest to the longest); its
  rows' input lengths are uniform in (previous bucket, bucket], each split
  into a context and a 1..16-token continuation, with random ids.
  """
  buckets = loglikelihood.bucket_lengths(max_len, MIN_BUCKET)
  if num_batches >= len(buckets):
    chosen = [j % len(buckets) for j in range(num_batches)]
  else:
    chosen = np.linspace(0, len(buckets) - 1, num_batches).round().astype(
        int).tolist()
  rng = np.random.default_rng(seed)
  requests = []
  for index in chosen:
    low = buckets[index - 1] + 1 if index else 1
    for _ in range(batch_size):
      length = int(rng.integers(low, buckets[index] + 1))   # input positions
      ids = rng.integers(0, vocab_size, length + 1).tolist()
      cont = int(rng.integers(1, min(16, length) + 1))
      requests.append(loglikelihood.Request(tuple(ids[:-cont]),
                                            tuple(ids[-cont:])))
  return requests


def time_scorer(scorer: loglikelihood.Scorer,
                requests: Sequence[loglikelihood.Request], repeats: int
                ) -> dict[str, float]:
  """{'warmup_s', 'compile_s', 'median_s', 'times_s'} of
  scorer.loglikelihood(requests): one warm-up call, then `repeats` timed."""
  start = time.perf_counter()
  scorer.loglikelihood(requests, desc='warm-up')
  warmup = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    scorer.loglikelihood(requests, desc='timed')
    times.append(time.perf_counter() - start)
  median = statistics.median(times)
  return {'warmup_s': warmup, 'compile_s': max(warmup - median, 0.0),
          'median_s': median, 'times_s': times}


# --- main ---------------------------------------------------------------


def _load_config(spec: str, *, backend: str, dtype: str
                 ) -> tuple[ml_collections.ConfigDict, str]:
  """The timed config with CLI overrides, and a note on what changed."""
  config = config_lib.load_config(spec)
  notes = []
  if not config.model.dense_ffn:
    wanted = backend
    if wanted == 'auto':
      wanted = config.moe.backend
      if wanted in ('pallas', 'auto') and jax.default_backend() == 'cpu':
        wanted = 'blocked'       # Pallas runs in (slow) interpret mode on CPU
        notes.append(f"moe.backend {config.moe.backend} -> blocked (Pallas "
                     "interprets on CPU; --backend to choose)")
    elif wanted != config.moe.backend:
      notes.append(f'moe.backend {config.moe.backend} -> {wanted}')
    config.moe.backend = wanted
  if dtype and dtype != config.train.dtype:
    notes.append(f'train.dtype {config.train.dtype} -> {dtype}')
    config.train.dtype = dtype
  return config, '; '.join(notes)


def _load_tokenizer(path: str, separator: str):
  """(tokenizer, prefix ids) of a .model file or an HF model directory."""
  if os.path.isdir(path):
    tokenizer = tokenizer_lib.load_hf_tokenizer(path)
    return tokenizer, text_scorer_lib.document_prefix(tokenizer)
  tokenizer = tokenizer_lib.load_tokenizer(path)
  return tokenizer, text_scorer_lib.document_prefix(tokenizer,
                                                    separator=separator)


def _same_config(a: str, b: str) -> bool:
  """Whether two config specs name the same file and argument."""
  (path_a, _, arg_a), (path_b, _, arg_b) = a.partition(':'), b.partition(':')
  return os.path.abspath(path_a) == os.path.abspath(path_b) and arg_a == arg_b


def _minutes(seconds: float) -> str:
  return f'{seconds / 60:.2f} min'


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--config', default='configs/smoe_154m.py:tiny',
                      help='the model to time: a config file[:arg]')
  parser.add_argument('--projection_config', default='configs/smoe_154m.py',
                      help='the model the H100 projection is for')
  parser.add_argument('--batch_size', type=int, default=32,
                      help='Scorer rows per batch (config.eval.batch_size)')
  parser.add_argument('--repeats', type=int, default=5,
                      help='timed runs after one warm-up (median reported)')
  parser.add_argument('--max_requests', type=int, default=None,
                      help='synthetic requests per timed run (rounded up to '
                      'whole batches); default 8 batches for a :tiny '
                      'config, 2 otherwise')
  parser.add_argument('--data_dir', default='../shared/data/lm_eval',
                      help='the folder of task folders')
  parser.add_argument('--tokenizer', default='',
                      help='a SentencePiece .model (or HF model folder) to '
                      "count tokens; '' estimates chars / 4")
  parser.add_argument('--mfu', type=float, default=0.3,
                      help='ASSUMED model-FLOPs utilisation on the H100')
  parser.add_argument('--backend', default='auto',
                      help="moe.backend of the timed model; 'auto' keeps the "
                      "config's, except pallas -> blocked on CPU")
  parser.add_argument('--dtype', default='',
                      help="train.dtype of the timed model ('' = config's)")
  parser.add_argument('--json', default='', help='write every figure here')
  args = parser.parse_args(argv)
  if args.batch_size < 1 or args.repeats < 1:
    parser.error('--batch_size and --repeats must be positive')
  if not 0 < args.mfu <= 1:
    parser.error(f'--mfu={args.mfu}: expected a fraction in (0, 1]')
  return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """Runs the benchmark, prints it and returns every figure."""
  args = parse_args(argv)
  config, overrides = _load_config(args.config, backend=args.backend,
                                   dtype=args.dtype)
  projection = config_lib.load_config(args.projection_config)
  devices = jax.devices()

  # 1. Measured speed.
  scorer = build_scorer(config, batch_size=args.batch_size)
  batch = scorer.batch_size
  tiny = 'tiny' in args.config.partition(':')[2]
  max_requests = args.max_requests or (8 if tiny else 2) * batch
  num_batches = max(1, math.ceil(max_requests / batch))
  requests = synthetic_requests(num_batches, batch, max_len=scorer.max_len,
                                vocab_size=config.model.vocab_size)
  timed_packing = pack(np.asarray([len(r.context) + len(r.continuation)
                                   for r in requests]),
                       max_len=scorer.max_len, batch_size=batch)
  timing = time_scorer(scorer, requests, args.repeats)
  median = timing['median_s']
  achieved = timed_packing.flops(config, batch) / median
  measured = {
      'requests': len(requests), 'batches': timed_packing.batches,
      'requests_per_s': len(requests) / median,
      'tokens_per_s': timed_packing.tokens / median,
      'padded_tokens_per_s': timed_packing.padded_tokens / median,
      'flops_per_s': achieved, **timing}
  peak_here = flops_lib.peak_flops(devices[0].device_kind)
  if peak_here:
    measured['mfu'] = achieved / (peak_here * len(devices))
  print(f'device: {devices[0].device_kind} x {len(devices)}; timed config '
        f'{args.config} (seq_len {config.data.seq_len}, '
        f'{config.train.dtype}'
        + ('' if config.model.dense_ffn else f', backend {config.moe.backend}')
        + f'){"; " + overrides if overrides else ""}; random init')
  print(f'timed: {len(requests)} synthetic requests in {num_batches} batches '
        f'of {batch} (bucket: batches '
        + ', '.join(f'{b}: {n}' for b, n in timed_packing.batches.items())
        + f'); warm-up {timing["warmup_s"]:.2f} s, compile '
        f'{timing["compile_s"]:.2f} s (warm-up - median), median of '
        f'{args.repeats} runs {median:.3f} s')
  print(f'measured: {measured["requests_per_s"]:,.1f} requests/s, '
        f'{measured["tokens_per_s"]:,.0f} tokens/s (padded '
        f'{measured["padded_tokens_per_s"]:,.0f}/s), {achieved / 1e9:,.2f} '
        'GFLOP/s forward'
        + (f', MFU {100 * measured["mfu"]:.1f}%' if peak_here else ''))

  # 2. Workload.
  if args.tokenizer:
    tokenizer, prefix = _load_tokenizer(args.tokenizer,
                                        projection.data.doc_separator)
    count, prefix_len = tokenizer_counts(tokenizer), len(prefix)
    counted_by = (f'tokenizer {args.tokenizer} (vocab '
                  f'{tokenizer.vocab_size:,}), prefix {prefix_len} tokens')
  else:
    count = estimated_counts
    prefix_len = math.ceil(len(projection.data.doc_separator)
                           / CHARS_PER_TOKEN) or 1
    counted_by = (f'NO tokenizer: tokens ESTIMATED as ceil(chars / '
                  f'{CHARS_PER_TOKEN:g}), prefix {prefix_len} tokens')
  if not os.path.isdir(args.data_dir):
    print(f'workload: {args.data_dir} not found; every task is estimated')
  workloads = task_workloads(args.data_dir, count, prefix_len)
  ratio = measured_chars_per_token(workloads,
                                   tokenized=bool(args.tokenizer))

  # 3. Projection.
  peak = flops_lib.PEAK_BF16_FLOPS[TARGET_DEVICE]
  rate = peak * args.mfu
  own_len = scorer.max_len
  rows_out, total = [], {'requests': 0, 'tokens': 0, 'padded_tokens': 0,
                         'batches': 0, 'flops': 0.0, 'own_flops': 0.0}
  for w in workloads:
    packing = pack(w.rows, max_len=projection.data.seq_len,
                   batch_size=args.batch_size)
    flops = packing.flops(projection, args.batch_size)
    own_flops = pack(w.rows, max_len=own_len, batch_size=batch).flops(
        config, batch)
    rows_out.append({
        'task': w.name, 'display': w.display, 'pairs': w.pairs,
        'requests': packing.requests, 'tokens': packing.tokens,
        'padded_tokens': packing.padded_tokens, 'batches': packing.batches,
        'flops': flops, 'h100_s': flops / rate, 'cpu_s': flops / achieved,
        'own_cpu_s': own_flops / achieved, 'source': w.source})
    total['requests'] += packing.requests
    total['tokens'] += packing.tokens
    total['padded_tokens'] += packing.padded_tokens
    total['batches'] += sum(packing.batches.values())
    total['flops'] += flops
    total['own_flops'] += own_flops
  h100_s, cpu_s = total['flops'] / rate, total['flops'] / achieved
  own_cpu_s = total['own_flops'] / achieved

  print(f'\nworkload: {counted_by}; Scorer batches of {args.batch_size} at '
        f'the projection model\'s seq_len {projection.data.seq_len}')
  per_token = {s: forward_flops_per_token(projection, s) / 1e6
               for s in (MIN_BUCKET, projection.data.seq_len)}
  print(f'projection model {args.projection_config}: '
        f'{per_token[projection.data.seq_len]:,.1f} MFLOP forward per token '
        f'at S={projection.data.seq_len} ({per_token[MIN_BUCKET]:,.1f} at '
        f'S={MIN_BUCKET}); {TARGET_DEVICE} {peak / 1e12:,.0f} TFLOP/s bf16 '
        f'peak x ASSUMED MFU {args.mfu:g}')
  print('| task | requests | tokens | padded tokens | '
        f'{TARGET_DEVICE} s | CPU s | source |')
  print('|---|---:|---:|---:|---:|---:|---|')
  for r in rows_out:
    source = 'data' if r['source'] == 'data' else 'estimate*'
    print(f'| {r["display"]} | {r["requests"]:,} | {r["tokens"]:,} | '
          f'{r["padded_tokens"]:,} | {r["h100_s"]:,.1f} | {r["cpu_s"]:,.0f} | '
          f'{source} |')
  print(f'| total | {total["requests"]:,} | {total["tokens"]:,} | '
        f'{total["padded_tokens"]:,} | {h100_s:,.1f} | {cpu_s:,.0f} | |')
  print(f'{total["batches"]:,} batches of {args.batch_size}; FLOPs only: '
        'per-batch host time is not in the projection')
  for r in rows_out:
    if r['source'] != 'data':
      print(f'* {r["display"]}: {r["source"]}; at {ratio:.2f} chars/token; '
            f'request lengths spread evenly over {ESTIMATE_SPREAD[0]:g}-'
            f'{ESTIMATE_SPREAD[1]:g}x the mean (assumed)')
  verdict = 'within' if h100_s / 60 <= TARGET_MINUTES else 'OVER'
  print(f'projection: all nine tasks with {args.projection_config} on one '
        f'{TARGET_DEVICE} at ASSUMED MFU {args.mfu:g}: {_minutes(h100_s)} vs '
        f'the {TARGET_MINUTES:g}-minute target ({verdict} target)')
  same = _same_config(args.config, args.projection_config)
  print(f'this machine ({devices[0].device_kind} x {len(devices)}) at the '
        f'measured {achieved / 1e9:,.2f} GFLOP/s: {_minutes(cpu_s)} for the '
        'projection model'
        + (f' (measured on it{"; " + overrides if overrides else ""})'
           if same else
           f' (FLOP-scaled from {args.config}); {_minutes(own_cpu_s)} for '
           f'{args.config} itself at its seq_len {own_len}'))

  figures = {
      'device': devices[0].device_kind, 'device_count': len(devices),
      'config': args.config, 'projection_config': args.projection_config,
      'batch_size': args.batch_size, 'repeats': args.repeats,
      'overrides': overrides, 'measured': measured, 'counted_by': counted_by,
      'prefix_len': prefix_len, 'chars_per_token': ratio,
      'estimate_spread': ESTIMATE_SPREAD, 'tasks': rows_out, 'total': total,
      'peak_flops': peak, 'mfu_assumed': args.mfu,
      'h100_minutes': h100_s / 60, 'cpu_minutes': cpu_s / 60,
      'own_cpu_minutes': own_cpu_s / 60, 'target_minutes': TARGET_MINUTES}
  print(f'requests_per_s={measured["requests_per_s"]:.2f}')
  print(f'tokens_per_s={measured["tokens_per_s"]:.1f}')
  print(f'compile_s={timing["compile_s"]:.2f}')
  print(f'workload_requests={total["requests"]}')
  print(f'workload_tokens={total["tokens"]}')
  print(f'h100_minutes={h100_s / 60:.3f}')
  print(f'cpu_minutes={cpu_s / 60:.1f}')
  if args.json:
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, 'w', encoding='utf-8') as f:
      json.dump(_jsonable(figures), f, indent=1)
    print(f'wrote {args.json}')
  return figures


def _jsonable(value: Any) -> Any:
  """Figures -> JSON types (dict keys as strings, numpy as Python)."""
  if isinstance(value, dict):
    return {str(k): _jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  if isinstance(value, np.generic):
    return value.item()
  return value


if __name__ == '__main__':
  main(sys.argv[1:])
