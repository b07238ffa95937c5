"""grain pipeline: documents -> tokens -> packed windows -> shuffled batches.

  documents ─ tokenize(text + '<STORY_SEP>') ─ concatenate ─► stream [N]
  stream ─ cut into non-overlapping windows of S+1 tokens ─► [W, S+1]
  (the tail of the last window is dropped; the last `valid_windows` windows
   are held out for validation unless a separate validation source is given)
  train windows ─ grain shuffle(seed), reshuffled each epoch ─ repeat ─
    process slice ─ batch ─► {'inputs': [B, S], 'targets': [B, S]} int32

This is LibMoE's layout (algorithms.md §6.2-§6.3): samples of S+1 = 1025
tokens, inputs and targets offset by one, windows permuted with a seed, and
each process reads a contiguous slice of every global batch: process p of P
gets rows [p*B/P, (p+1)*B/P) of global batch b. For the synthetic corpus a
batch also holds 'domain' [B] int32: the domain of the document that the
window's first token belongs to.

Tokenization runs once, up front (capped by `max_tokens`, like LibMoE, which
tokenises only what the run needs), and can be cached on disk so that later
runs and other processes memory-map it. Everything after it is a grain
MapDataset with random access, so the iterator's state is one integer, the
next batch index: `it.get_state()` / `it.set_state(state)` (or grain's orbax
`grain.checkpoint.CheckpointHandler`) resume exactly where a run stopped.

Errors name the argument at fault, first (`seq_len=0: expected >= 1.`) and in
backticks in hints (`global_batch_size`); moe_jax/data/from_config.py maps
the names to config fields.

Dimension legend: B batch (per process), G global batch, S sequence (context),
W windows, N tokens in the stream, P processes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time
from typing import Any, ClassVar, Iterable, Sequence

from absl import logging
import grain
import numpy as np

from moe_jax.data import sources as sources_lib
from moe_jax.data import tokenizer as tokenizer_lib


# --------------------------------------------------------------------------
# Tokenize and concatenate.


@dataclasses.dataclass(frozen=True)
class TokenStream:
  """Documents tokenized and concatenated, separator included.

  Attributes:
    tokens: [N] uint16 (vocabulary <= 65536) or int32; may be a memmap.
    doc_starts: [num_docs] int64, offset of each document's first token.
    doc_domains: [num_docs] int32, each document's domain (-1: unlabeled).
    num_domains: number of domain labels (0: unlabeled source).
  """

  tokens: np.ndarray
  doc_starts: np.ndarray
  doc_domains: np.ndarray
  num_domains: int = 0

  def __len__(self) -> int:
    return len(self.tokens)


def _token_dtype(tokenizer: Any) -> np.dtype:
  vocab = getattr(tokenizer, "vocab_size", None)
  # uint16 halves the memory of the stream (LibMoE stores uint16 chunks).
  return np.dtype(np.uint16 if vocab is not None and vocab <= 2**16
                  else np.int32)


def _iter_token_chunks(documents, tokenizer, separator, max_tokens,
                       chunk_docs):
  """Yields (tokens [n], doc_lengths [d], doc_domains [d]) chunks."""
  total = 0
  buffer: list[sources_lib.Document] = []

  def flush(docs):
    ids = tokenizer_lib.encode_many(
        tokenizer, [d.text + separator for d in docs])
    lengths = np.array([len(x) for x in ids], dtype=np.int64)
    flat = np.fromiter((t for x in ids for t in x), dtype=np.int64,
                       count=int(lengths.sum()))
    domains = np.array([d.domain for d in docs], dtype=np.int32)
    return flat, lengths, domains

  for doc in documents:
    if isinstance(doc, str):
      doc = sources_lib.Document(doc)
    buffer.append(doc)
    if len(buffer) < chunk_docs:
      continue
    flat, lengths, domains = flush(buffer)
    buffer = []
    if max_tokens is not None and total + len(flat) >= max_tokens:
      yield _truncate(flat, lengths, domains, max_tokens - total)
      return
    total += len(flat)
    yield flat, lengths, domains
  if buffer:
    flat, lengths, domains = flush(buffer)
    if max_tokens is not None and total + len(flat) > max_tokens:
      flat, lengths, domains = _truncate(flat, lengths, domains,
                                         max_tokens - total)
    yield flat, lengths, domains


def _truncate(flat, lengths, domains, keep):
  """The first `keep` tokens of a chunk, with the documents they touch."""
  ends = np.cumsum(lengths)
  num_docs = int(np.searchsorted(ends, keep, side="left")) + 1
  num_docs = min(num_docs, len(lengths))
  lengths = lengths[:num_docs].copy()
  lengths[-1] -= int(ends[num_docs - 1]) - keep
  return flat[:keep], lengths, domains[:num_docs]


def tokenize_documents(
    documents: Iterable[sources_lib.Document | str],
    tokenizer: tokenizer_lib.Tokenizer,
    *,
    separator: str = tokenizer_lib.DOC_SEPARATOR,
    max_tokens: int | None = None,
    num_domains: int = 0,
    chunk_docs: int = 256,
) -> TokenStream:
  """Tokenizes `text + separator` of each document and concatenates them.

  Args:
    documents: Documents or plain strings (e.g. `source.documents()`).
    tokenizer: anything with `encode(str) -> list[int]` and `vocab_size`.
    separator: text appended to every document before encoding (LibMoE:
      the literal '<STORY_SEP>'; '' for none).
    max_tokens: stop once the stream holds this many tokens (None: all).
    num_domains: the source's number of domain labels (0: unlabeled).
    chunk_docs: documents encoded per tokenizer call.

  Returns:
    A TokenStream with tokens [N], N <= max_tokens.
  """
  dtype = _token_dtype(tokenizer)
  tokens, lengths, domains = [], [], []
  for flat, lens, doms in _iter_token_chunks(documents, tokenizer, separator,
                                             max_tokens, chunk_docs):
    tokens.append(flat.astype(dtype))
    lengths.append(lens)
    domains.append(doms)
  return _assemble(tokens, lengths, domains, dtype, num_domains)


def _assemble(tokens, lengths, domains, dtype, num_domains) -> TokenStream:
  tokens = np.concatenate(tokens) if tokens else np.zeros([0], dtype)
  lengths = np.concatenate(lengths) if lengths else np.zeros([0], np.int64)
  starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
  if not len(lengths):
    starts = np.zeros([0], np.int64)
  doms = np.concatenate(domains) if domains else np.zeros([0], np.int32)
  return TokenStream(tokens, starts, doms.astype(np.int32), num_domains)


def _cache_key(source: sources_lib.Source, tokenizer: Any, separator: str,
               max_tokens: int | None) -> str:
  fingerprint = getattr(tokenizer, "fingerprint", None)
  tok_id = fingerprint() if fingerprint else repr(tokenizer)
  text = json.dumps([source.describe(), tok_id, separator, max_tokens])
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def load_or_tokenize(
    source: sources_lib.Source,
    tokenizer: tokenizer_lib.Tokenizer,
    *,
    cache_dir: str | os.PathLike | None = None,
    separator: str = tokenizer_lib.DOC_SEPARATOR,
    max_tokens: int | None = None,
) -> TokenStream:
  """`tokenize_documents(source)`, cached under `cache_dir` when given.

  The cache is keyed by the source's description (paths, sizes, mtimes),
  the tokenizer model's hash, the separator and `max_tokens`; tokens are
  memory-mapped on reuse. Written to a temporary directory and renamed, so
  concurrent processes never read a partial cache. A cache whose files do
  not match its meta.json (a truncated tokens.bin, say, from an interrupted
  copy) is logged as a warning, moved aside and rebuilt.

  Args:
    source: a Source.
    tokenizer: see `tokenize_documents`.
    cache_dir: directory for token caches (None: tokenize in memory).
    separator, max_tokens: see `tokenize_documents`.

  Returns:
    The TokenStream.

  Raises:
    ValueError: the cache is still inconsistent after a rebuild.
  """
  if cache_dir is None:
    logging.info("tokenizing %s in memory (no cache directory)",
                 describe_short(source))
    start = time.perf_counter()
    stream = tokenize_documents(source.documents(), tokenizer,
                                separator=separator, max_tokens=max_tokens,
                                num_domains=source.num_domains)
    logging.info("tokenized: %d tokens in %.1f s", len(stream.tokens),
                 time.perf_counter() - start)
    return stream
  cache_dir = os.fspath(cache_dir)
  key = _cache_key(source, tokenizer, separator, max_tokens)
  final = os.path.join(cache_dir, f"tokens-{key}")
  if os.path.exists(final):
    try:
      stream = _read_cache(final)
      logging.info("loaded token cache %s (%d tokens)", final,
                   len(stream.tokens))
      return stream
    except _BadCache as e:
      logging.warning("token cache %s is inconsistent (%s): rebuilding it.",
                      final, e)
      _discard(final)
  _build_cache(source, tokenizer, final, separator=separator,
               max_tokens=max_tokens)
  try:
    return _read_cache(final)
  except _BadCache as e:
    raise ValueError(
        f"cache_dir={cache_dir!r}: the token cache {final} is inconsistent "
        f"right after it was rebuilt ({e}). Delete the directory {final} "
        "(it is rebuilt on the next run) and check the disk."
    ) from e


class _BadCache(Exception):
  """A token cache whose files do not match its meta.json."""


def _read_cache(final: str) -> TokenStream:
  """The cached stream in `final`, checked against its meta.json.

  Raises:
    _BadCache: a file is missing, unreadable, or of the wrong size.
  """
  try:
    with open(os.path.join(final, "meta.json")) as f:
      meta = json.load(f)
    n, dtype = int(meta["num_tokens"]), np.dtype(meta["dtype"])
    num_domains = int(meta["num_domains"])
    doc_starts = np.load(os.path.join(final, "doc_starts.npy"))
    doc_domains = np.load(os.path.join(final, "doc_domains.npy"))
    size = os.path.getsize(os.path.join(final, "tokens.bin"))
  except (OSError, ValueError, KeyError, TypeError, EOFError) as e:
    raise _BadCache(f"{type(e).__name__}: {e}") from e
  # np.memmap of a short file fails with 'mmap length is greater than file
  # size', which names neither the file nor the fix: check first.
  if size != n * dtype.itemsize:
    raise _BadCache(f"tokens.bin holds {size} bytes, meta.json says {n} "
                    f"{dtype.name} tokens = {n * dtype.itemsize} bytes")
  if len(doc_starts) != len(doc_domains) or (
      len(doc_starts) and not 0 <= doc_starts[-1] <= n):
    raise _BadCache(f"doc_starts.npy ({len(doc_starts)} documents) and "
                    f"doc_domains.npy ({len(doc_domains)}) do not match")
  tokens = (np.memmap(os.path.join(final, "tokens.bin"), dtype=dtype,
                      mode="r", shape=(n,)) if n else np.zeros([0], dtype))
  return TokenStream(tokens, doc_starts, doc_domains, num_domains)


def _discard(final: str) -> None:
  """Removes a bad cache directory; a rename first, so no reader sees half."""
  aside = tempfile.mkdtemp(dir=os.path.dirname(final), prefix=".tokens-bad-")
  try:
    os.replace(final, os.path.join(aside, "cache"))
  except OSError:
    # Another process moved it first (and is rebuilding it).
    pass
  shutil.rmtree(aside, ignore_errors=True)


def _build_cache(source: sources_lib.Source,
                 tokenizer: tokenizer_lib.Tokenizer, final: str, *,
                 separator: str, max_tokens: int | None) -> None:
  """Tokenizes `source` into the cache directory `final`, atomically.

  Everything is written into a temporary directory next to `final`, which
  is then renamed to `final`: a reader sees the whole cache or none of it.
  """
  cache_dir = os.path.dirname(final)
  os.makedirs(cache_dir, exist_ok=True)
  logging.info("building the token cache %s from %s", final,
               describe_short(source))
  start = time.perf_counter()
  tmp = tempfile.mkdtemp(dir=cache_dir, prefix=".tokens-tmp-")
  try:
    dtype = _token_dtype(tokenizer)
    lengths, domains = [], []
    # Tokens go straight to disk: the stream can be larger than memory.
    with open(os.path.join(tmp, "tokens.bin"), "wb") as f:
      for flat, lens, doms in _iter_token_chunks(
          source.documents(), tokenizer, separator, max_tokens, 256):
        f.write(flat.astype(dtype).tobytes())
        lengths.append(lens)
        domains.append(doms)
    stream = _assemble([], lengths, domains, dtype, source.num_domains)
    np.save(os.path.join(tmp, "doc_starts.npy"), stream.doc_starts)
    np.save(os.path.join(tmp, "doc_domains.npy"), stream.doc_domains)
    num_tokens = int(sum(int(x.sum()) for x in lengths))
    with open(os.path.join(tmp, "meta.json"), "w") as f:
      json.dump({"dtype": dtype.name, "num_tokens": num_tokens,
                 "num_domains": source.num_domains,
                 "source": source.describe(), "separator": separator,
                 "max_tokens": max_tokens}, f, indent=1)
  except BaseException:
    # A source error (bad file, Ctrl-C) leaves no partial directory behind.
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  try:
    os.replace(tmp, final)
  except OSError:
    # Another process finished the same cache first: use theirs.
    shutil.rmtree(tmp, ignore_errors=True)
  logging.info("token cache: %d tokens in %.1f s -> %s", num_tokens,
               time.perf_counter() - start, final)


# --------------------------------------------------------------------------
# Pack into windows.


class PackedWindows:
  """Random-access windows of S+1 consecutive stream tokens (a grain source).

  Window i covers stream tokens [(start + i)(S+1), (start + i + 1)(S+1)).

  Args:
    stream: the TokenStream.
    seq_len: S; windows hold S+1 tokens (inputs and targets offset by 1).
    start, stop: the range of window indices of the stream to expose
      (default: all complete windows).
  """

  def __init__(self, stream: TokenStream, seq_len: int, start: int = 0,
               stop: int | None = None):
    if seq_len < 1:
      raise ValueError(f"seq_len={seq_len}: expected >= 1.")
    self.stream, self.seq_len = stream, seq_len
    total = len(stream.tokens) // (seq_len + 1)
    stop = total if stop is None else stop
    if not 0 <= start <= stop <= total:
      raise ValueError(f"window range [{start}, {stop}) outside [0, {total}).")
    self.start, self.stop = start, stop
    self.labeled = stream.num_domains > 0
    if self.labeled:
      # The document holding each window's first token.
      first = np.arange(start, stop, dtype=np.int64) * (seq_len + 1)
      doc = np.searchsorted(stream.doc_starts, first, side="right") - 1
      self.domains = stream.doc_domains[doc].astype(np.int32)  # [W]

  def __len__(self) -> int:
    return self.stop - self.start

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    if not 0 <= index < len(self):
      raise IndexError(f"window {index} out of range [0, {len(self)}).")
    w = self.seq_len + 1
    begin = (self.start + index) * w
    out = {"tokens": np.asarray(self.stream.tokens[begin:begin + w])}  # [S+1]
    if self.labeled:
      out["domain"] = self.domains[index]
    return out

  def __repr__(self) -> str:
    return (f"PackedWindows(seq_len={self.seq_len}, windows=[{self.start}, "
            f"{self.stop}))")


def pack_windows(tokens: np.ndarray, seq_len: int) -> np.ndarray:
  """Concatenated tokens [N] -> windows [N // (S+1), S+1]; the tail drops."""
  w = seq_len + 1
  n = len(tokens) // w
  return np.asarray(tokens[:n * w]).reshape(n, w)


# --------------------------------------------------------------------------
# Shuffle, repeat, per-process slice, batch.


def resolve_process(process_index: int | None,
                    process_count: int | None) -> tuple[int, int]:
  """(index, count), from jax.process_index()/process_count() when None."""
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index = (jax.process_index() if process_index is None
                     else process_index)
    process_count = (jax.process_count() if process_count is None
                     else process_count)
  if not 0 <= process_index < process_count:
    raise ValueError(
        f"process_index={process_index} outside [0, {process_count}).")
  return process_index, process_count


class IndexMapDataset(grain.MapDataset):
  """A view of `parent` whose element i is parent[_parent_index(i)].

  Subclasses define __len__ and _parent_index; reads (single, slice, batch
  of indices) go through the mapping, so the view is random access and its
  iterator state is one index, like the parent's.
  """

  def _parent_index(self, index: int) -> int:
    raise NotImplementedError

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    return self._parent[self._parent_index(index)]

  def _getitems(self, indices: Sequence[int]):
    return self._parent._getitems(  # pylint: disable=protected-access
        [self._parent_index(i) for i in indices])


class ProcessSliceMapDataset(IndexMapDataset):
  """Process p's contiguous slice of every global batch.

  Element i of this dataset is parent element b*G + p*B + r, where
  (b, r) = divmod(i, B) and B = G / P; batching it by B gives rows
  [p*B, (p+1)*B) of global batch b. An incomplete last group is dropped.
  """

  def __init__(self, parent: grain.MapDataset, global_batch: int,
               process_index: int, process_count: int):
    super().__init__(parent)
    self._global = global_batch
    self._local = global_batch // process_count
    self._offset = process_index * self._local
    self._desc = f"{process_index}/{process_count}"

  def __len__(self) -> int:
    return (len(self._parent) // self._global) * self._local

  def _parent_index(self, index: int) -> int:
    batch, row = divmod(index, self._local)
    return batch * self._global + self._offset + row

  def __str__(self) -> str:
    return (f"ProcessSliceMapDataset(global_batch={self._global}, "
            f"process={self._desc})")


def _to_inputs_targets(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  tokens = batch["tokens"]  # [B, S+1]
  out = {"inputs": tokens[:, :-1].astype(np.int32),    # [B, S]
         "targets": tokens[:, 1:].astype(np.int32)}    # [B, S]
  if "domain" in batch:
    out["domain"] = batch["domain"].astype(np.int32)   # [B]
  return out


def batched_dataset(
    windows: Sequence[dict[str, np.ndarray]],
    *,
    global_batch_size: int,
    seed: int | None = None,
    shuffle: bool = True,
    num_epochs: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
):
  """This process's batches of `windows` as a grain MapDataset.

  Args:
    windows: random-access windows (PackedWindows) of {'tokens': [S+1]}.
    global_batch_size: G, rows of one global batch (all processes).
    seed: shuffle seed (each epoch is shuffled with seed + epoch).
    shuffle: False for validation: windows in stream order.
    num_epochs: passes over the windows (None: forever). Global batches
      run across epoch boundaries; only the incomplete last global batch of
      a finite dataset is dropped.
    process_index, process_count: this process and their number (default
      jax.process_index() / jax.process_count()).

  Returns:
    grain.MapDataset of {'inputs': [B, S] int32, 'targets': [B, S] int32,
    'domain': [B] int32 (labeled sources)} with B = G / P.
  """
  process_index, process_count = resolve_process(process_index, process_count)
  if global_batch_size < 1 or global_batch_size % process_count:
    raise ValueError(
        f"global_batch_size={global_batch_size}: expected a positive "
        f"multiple of the process count {process_count}."
    )
  if not len(windows):
    raise ValueError("windows: none to batch, the token stream is shorter "
                     "than one window; lower `seq_len` or add data.")
  ds = grain.MapDataset.source(windows)
  if shuffle:
    if seed is None:
      raise ValueError("seed=None: shuffle=True needs a seed.")
    ds = ds.shuffle(seed=seed)
  if num_epochs != 1:
    # After shuffle: grain reshuffles each epoch with seed + epoch.
    ds = ds.repeat(num_epochs)
  ds = ProcessSliceMapDataset(ds, global_batch_size, process_index,
                              process_count)
  ds = ds.batch(global_batch_size // process_count, drop_remainder=True)
  return ds.map(_to_inputs_targets)


def make_iterator(dataset, *, state: dict | None = None,
                  num_threads: int = 2, prefetch: int = 4):
  """A checkpointable iterator over a batched MapDataset.

  Args:
    dataset: from `batched_dataset`.
    state: an earlier `iterator.get_state()` to resume from.
    num_threads: grain reader threads (0: read in the calling thread).
    prefetch: batches read ahead.

  Returns:
    grain DatasetIterator; `get_state()` is {'next_index': batches taken}.
  """
  read = grain.ReadOptions(num_threads=num_threads,
                           prefetch_buffer_size=prefetch)
  iterator = iter(dataset.to_iter_dataset(read))
  if state is not None:
    iterator.set_state(state)
  return iterator


# --------------------------------------------------------------------------
# Everything together.


class BatchIterators:
  """Iterators over a pipeline's `train` and `valid` batch datasets.

  The dataclass using it holds train, valid (or None), num_threads (grain
  reader threads) and prefetch (batches read ahead); NO_VALID says how to
  get validation data when there is none.
  """

  NO_VALID: ClassVar[str] = 'build the pipeline with validation data'

  @property
  def num_valid_batches(self) -> int:
    return len(self.valid) if self.valid is not None else 0

  def train_iterator(self, state: dict | None = None):
    """Training iterator, resumed from `state` (a get_state()) when given."""
    return make_iterator(self.train, state=state,
                         num_threads=self.num_threads, prefetch=self.prefetch)

  def valid_iterator(self):
    """A fresh pass over the validation batches (same order every time)."""
    if self.valid is None:
      raise ValueError(f'no validation data: {self.NO_VALID}.')
    return make_iterator(self.valid, num_threads=self.num_threads,
                         prefetch=self.prefetch)


@dataclasses.dataclass
class Pipeline(BatchIterators):
  """Training and validation batches of one process.

  Attributes:
    train: grain.MapDataset of training batches (infinite by default).
    valid: grain.MapDataset of validation batches in stream order, or None.
    seq_len: S.
    global_batch_size: G.
    local_batch_size: B = G / P.
    num_train_windows, num_valid_windows: windows in each split (validation
      uses only complete global batches: num_valid_batches * G of them).
    num_train_tokens: tokens in the training stream.
    vocab_size: the tokenizer's vocabulary.
    num_domains, domain_names: the source's domain labels (0 / ()).
  """

  train: Any
  valid: Any
  seq_len: int
  global_batch_size: int
  local_batch_size: int
  num_train_windows: int
  num_valid_windows: int
  num_train_tokens: int
  vocab_size: int | None
  num_domains: int = 0
  domain_names: tuple[str, ...] = ()
  num_threads: int = 2
  prefetch: int = 4

  NO_VALID: ClassVar[str] = (
      'build the pipeline with `valid_windows` > 0 (windows from the end of '
      'the training data) or a `valid_source`')

  def summary(self) -> dict[str, Any]:
    """Sizes for logging."""
    return {k: getattr(self, k) for k in (
        "seq_len", "global_batch_size", "local_batch_size",
        "num_train_windows", "num_valid_windows", "num_valid_batches",
        "num_train_tokens", "vocab_size", "num_domains")}


def build_pipeline(
    source: sources_lib.Source,
    tokenizer: tokenizer_lib.Tokenizer,
    *,
    seq_len: int,
    global_batch_size: int,
    seed: int = 123,
    valid_source: sources_lib.Source | None = None,
    valid_windows: int = 0,
    separator: str = tokenizer_lib.DOC_SEPARATOR,
    max_tokens: int | None = None,
    max_valid_tokens: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    num_epochs: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    num_threads: int = 2,
    prefetch: int = 4,
) -> Pipeline:
  """Tokenizes, packs and batches a source for training and validation.

  Validation: with `valid_source`, its first `valid_windows` windows (all if
  0); without, the last `valid_windows` windows of the training stream,
  which training then never sees. Validation batches are not shuffled and
  come in stream order; only complete global batches are used.

  Args:
    source: training documents.
    tokenizer: see `tokenize_documents`.
    seq_len: S (LibMoE: 1024; windows hold S+1 tokens).
    global_batch_size: G, sequences per step over all processes.
    seed: window shuffle seed (LibMoE: 123).
    valid_source: optional separate validation documents.
    valid_windows: see above (LibMoE: 1008 windows).
    separator: appended to each document (LibMoE: '<STORY_SEP>').
    max_tokens: cap on training-stream tokens (None: the whole source).
    max_valid_tokens: cap on validation-source tokens.
    cache_dir: token cache directory (None: tokenize in memory every time).
    num_epochs: passes over the training windows (None: forever).
    process_index, process_count: default jax.process_index()/count().
    num_threads, prefetch: grain reader threads and read-ahead batches.

  Returns:
    A Pipeline.

  Raises:
    ValueError: too little data for one global batch, or invalid sizes.
  """
  process_index, process_count = resolve_process(process_index, process_count)
  if valid_windows < 0:
    raise ValueError(f"valid_windows={valid_windows}: expected >= 0.")
  stream = load_or_tokenize(source, tokenizer, cache_dir=cache_dir,
                            separator=separator, max_tokens=max_tokens)
  total = len(stream.tokens) // (seq_len + 1)
  if valid_source is None:
    train = PackedWindows(stream, seq_len, 0, max(total - valid_windows, 0))
    valid = PackedWindows(stream, seq_len, len(train), total)
  else:
    train = PackedWindows(stream, seq_len)
    vstream = load_or_tokenize(valid_source, tokenizer, cache_dir=cache_dir,
                               separator=separator,
                               max_tokens=max_valid_tokens)
    vtotal = len(vstream.tokens) // (seq_len + 1)
    valid = PackedWindows(vstream, seq_len, 0,
                          min(valid_windows, vtotal) if valid_windows else
                          vtotal)
  if len(train) < global_batch_size:
    held_out = valid_windows if valid_source is None else 0
    raise ValueError(
        f"global_batch_size={global_batch_size}: more than the {len(train)} "
        f"training windows of `seq_len`+1={seq_len + 1} tokens that "
        f"{describe_short(source)} makes ({len(stream.tokens)} tokens, after "
        f"{held_out} validation windows, `valid_windows`, held out). Add "
        "data, raise `max_tokens`, or lower `seq_len` / `global_batch_size`."
    )
  common = dict(global_batch_size=global_batch_size,
                process_index=process_index, process_count=process_count)
  train_ds = batched_dataset(train, seed=seed, shuffle=True,
                             num_epochs=num_epochs, **common)
  valid_ds = None
  if len(valid) >= global_batch_size:
    valid_ds = batched_dataset(valid, shuffle=False, num_epochs=1, **common)
  elif len(valid) or (valid_source is not None):
    short = (f"{len(valid)} validation windows of `seq_len`+1={seq_len + 1} "
             "tokens are fewer than one global batch (`global_batch_size`="
             f"{global_batch_size})")
    if valid_source is not None:
      raise ValueError(
          f"valid_source: {describe_short(valid_source)} makes only {short}. "
          "Give more validation data, or raise `max_valid_tokens`."
      )
    raise ValueError(
        f"valid_windows={valid_windows}: {short}. Raise `valid_windows` to "
        "a multiple of `global_batch_size`, or set it to 0."
    )
  return Pipeline(
      train=train_ds, valid=valid_ds, seq_len=seq_len,
      global_batch_size=global_batch_size,
      local_batch_size=global_batch_size // process_count,
      num_train_windows=len(train), num_valid_windows=len(valid),
      num_train_tokens=len(train) * (seq_len + 1),
      vocab_size=getattr(tokenizer, "vocab_size", None),
      num_domains=stream.num_domains,
      domain_names=tuple(getattr(source, "domain_names", ())),
      num_threads=num_threads, prefetch=prefetch)


def describe_short(source: sources_lib.Source, limit: int = 120) -> str:
  """The source's description, cut to `limit` characters for messages."""
  text = source.describe()
  return text if len(text) <= limit else text[:limit] + "...)"
