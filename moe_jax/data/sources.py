"""Document sources: each yields the documents of a corpus as text strings.

Every source has the same small interface (`Source`):

  documents() -> Iterator[Document(text, domain)]   # domain -1 when unlabeled
  __iter__()  -> Iterator[str]                        # the texts only
  num_domains -> int                                  # 0 when unlabeled
  describe()  -> str                                  # stable id for caches

Kinds (`make_source(kind, ...)`):

  files         text / JSON-lines / Parquet files, picked by file extension
  text          .txt files; one document per file, per line or per paragraph
  jsonl         JSON lines (.jsonl/.json, optionally .gz or .zst), field 'text'
  parquet       Parquet files, column 'text' (SlimPajama / HF shards)
  array_record  ArrayRecord files of tf.train.Example protos or raw UTF-8
  tfds          a prepared TFDS dataset by name (never downloads)
  synthetic     a built-in multi-domain corpus that needs no files

File sources take a file, a directory (searched recursively for the kind's
suffixes) or a glob pattern, or a list of these; directories of shards, as
SlimPajama arrives, are read in sorted order, optionally permuted with
`shard_seed` (LibMoE permutes its shards with np.random.default_rng(123),
algorithms.md §6.3).

Errors name the argument at fault, first (`path='/x': no Parquet data
found ...`) and in backticks in hints (`text_field`); this module knows no
config fields, moe_jax/data/from_config.py maps the names to them. A missing
path raises FileNotFoundError naming what was looked for; text that is not
UTF-8 raises ValueError naming the file and line.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import os
from typing import Iterator, NamedTuple, Sequence

import numpy as np

_SYNTHETIC_HINT = (
    "or set `kind`='synthetic' to train on the built-in corpus"
)


class Document(NamedTuple):
  """One document: its text and its domain label (-1 when unlabeled)."""

  text: str
  domain: int = -1


class Source:
  """Base class of document sources (see the module docstring)."""

  num_domains: int = 0
  domain_names: tuple[str, ...] = ()

  def documents(self) -> Iterator[Document]:
    raise NotImplementedError

  def __iter__(self) -> Iterator[str]:
    for doc in self.documents():
      yield doc.text

  def describe(self) -> str:
    raise NotImplementedError

  def __repr__(self) -> str:
    return self.describe()


# --------------------------------------------------------------------------
# Paths.


def resolve_paths(
    spec: str | os.PathLike | Sequence[str | os.PathLike],
    suffixes: Sequence[str],
    *,
    kind: str,
    shard_seed: int | None = None,
) -> list[str]:
  """Expands files, directories and glob patterns into a list of files.

  Args:
    spec: a path, a directory (searched recursively for files ending in one
      of `suffixes`), a glob pattern, or a list of these.
    suffixes: accepted file name endings for directory searches, e.g.
      ('.jsonl', '.jsonl.gz'). Explicit files and globs are taken as given.
    kind: the source kind, for error messages ('jsonl', ...).
    shard_seed: if set, the file list is permuted with
      np.random.default_rng(shard_seed) (LibMoE's shard order uses 123).

  Returns:
    The files, sorted (then permuted when `shard_seed` is set).

  Raises:
    FileNotFoundError: an entry matches no file.
    ValueError: `shard_seed` is not None or an integer >= 0.
  """
  if shard_seed is not None and (
      isinstance(shard_seed, bool) or not isinstance(shard_seed, int)
      or shard_seed < 0):
    raise ValueError(
        f"shard_seed={shard_seed!r}: expected an integer >= 0 (LibMoE: 123), "
        "or None to read the files in sorted order.")
  if isinstance(spec, (str, os.PathLike)):
    spec = [spec]
  if not spec:
    raise FileNotFoundError(
        f"path is empty: no {kind} files to read. Set `path` to a file, a "
        f"directory or a glob pattern, {_SYNTHETIC_HINT}."
    )
  files: list[str] = []
  for entry in spec:
    entry = os.path.expanduser(os.fspath(entry))
    if os.path.isfile(entry):
      found, what = [entry], ""
    elif os.path.isdir(entry):
      found = sorted(
          os.path.join(root, name)
          for root, _, names in os.walk(entry)
          for name in names
          if name.endswith(tuple(suffixes))
      )
      what = f"files ending in {', '.join(suffixes)} under the directory"
    elif glob.has_magic(entry):
      found = sorted(p for p in glob.glob(entry, recursive=True)
                     if os.path.isfile(p))
      what = "files matching the glob pattern"
    else:
      found, what = [], "the file or directory"
    if not found:
      raise FileNotFoundError(
          f"path={entry!r}: no {kind} data found (looked for {what} "
          f"{os.path.abspath(entry)!r}). Point `path` at a file, a "
          f"directory or a glob pattern such as '/data/slimpajama/train/"
          f"*.parquet', {_SYNTHETIC_HINT}."
      )
    files.extend(found)
  if shard_seed is not None:
    # LibMoE's shard order (algorithms.md §6.3): the list indexed by a
    # permutation drawn from a fresh generator.
    order = np.random.default_rng(shard_seed).permutation(len(files))
    files = [files[i] for i in order]
  return files


def _stat_id(paths: Sequence[str]) -> str:
  """Path, size and mtime of each file: changes when any file changes."""
  parts = []
  for p in paths:
    st = os.stat(p)
    parts.append(f"{os.path.abspath(p)}:{st.st_size}:{int(st.st_mtime)}")
  return ";".join(parts)


def _open_binary(path: str) -> io.BufferedIOBase:
  """Opens a possibly compressed (.gz, .zst) file for reading bytes."""
  if path.endswith(".gz"):
    return gzip.open(path, "rb")
  if path.endswith(".zst"):
    import pyarrow as pa  # pylint: disable=g-import-not-at-top
    raw = pa.CompressedInputStream(pa.OSFile(path, "rb"), "zstd")
    return io.BufferedReader(raw)
  return open(path, "rb")


def _open_text(path: str) -> io.TextIOBase:
  """Opens a possibly compressed (.gz, .zst) UTF-8 text file for reading."""
  if path.endswith((".gz", ".zst")):
    return io.TextIOWrapper(_open_binary(path), encoding="utf-8")
  return open(path, "r", encoding="utf-8")


def _not_utf8(path: str, error: UnicodeDecodeError) -> ValueError:
  """The error for a file that is not UTF-8, naming its first bad line.

  The decoder reads in blocks, so `error` does not say which line failed:
  the file is scanned again line by line, only on this failure path. A
  UTF-8 sequence never contains a newline byte, so lines decode alone.
  """
  where, detail = path, error.reason
  with _open_binary(path) as f:
    for lineno, line in enumerate(f, 1):
      try:
        line.decode("utf-8")
      except UnicodeDecodeError as e:
        where = f"{path}:{lineno}"
        detail = (f"byte 0x{line[e.start]:02x}, byte {e.start + 1} of the "
                  f"line: {e.reason}")
        break
  name = os.path.basename(path)
  stem, dot, ext = name.partition(".")
  fixed = f"{stem}.utf8{dot}{ext}"
  iconv = "iconv -f latin1 -t utf-8"
  if ext.endswith(("gz", "zst")):
    cat, pack = ("zcat", "gzip") if ext.endswith("gz") else ("zstdcat", "zstd")
    command = f"{cat} {name} | {iconv} | {pack} > {fixed}"
  else:
    command = f"{iconv} {name} > {fixed}"
  return ValueError(
      f"{where}: not UTF-8 text ({detail}). Text files are read as UTF-8: "
      f"re-encode the file in place (Latin-1 text: `{command} && mv "
      f"{fixed} {name}`), or remove binary files from `path`."
  )


# --------------------------------------------------------------------------
# File sources.


def _utf8_documents(paths, file_documents) -> Iterator[Document]:
  """file_documents(path) over every path; undecodable text names its file."""
  for path in paths:
    try:
      yield from file_documents(path)
    except UnicodeDecodeError as e:
      raise _not_utf8(path, e) from e


class TextSource(Source):
  """Plain text files.

  Args:
    path: file, directory (of .txt files), glob, or a list of these.
    doc_mode: 'file' (each file is one document), 'line' (each non-empty
      line) or 'paragraph' (blocks separated by blank lines).
    shard_seed: optional permutation seed for the file order.
  """

  suffixes = (".txt", ".txt.gz", ".raw", ".tokens")

  def __init__(self, path, *, doc_mode: str = "file",
               shard_seed: int | None = None):
    if doc_mode not in ("file", "line", "paragraph"):
      raise ValueError(
          f"doc_mode={doc_mode!r}: expected 'file', 'line' or "
          "'paragraph'."
      )
    self.paths = resolve_paths(path, self.suffixes, kind="text",
                               shard_seed=shard_seed)
    self.doc_mode = doc_mode

  def documents(self) -> Iterator[Document]:
    return _utf8_documents(self.paths, self._file_documents)

  def _file_documents(self, path: str) -> Iterator[Document]:
    with _open_text(path) as f:
      if self.doc_mode == "line":
        for line in f:
          line = line.rstrip("\r\n")
          if line.strip():
            yield Document(line)
        return
      text = f.read()
    if self.doc_mode == "file":
      if text:
        yield Document(text)
    else:
      text = text.replace("\r\n", "\n")
      for block in text.split("\n\n"):
        if block.strip():
          yield Document(block.strip("\n"))

  def describe(self) -> str:
    return f"TextSource({self.doc_mode}; {_stat_id(self.paths)})"


class JsonlSource(Source):
  """JSON-lines files: one JSON object per line, text under `text_field`.

  Args:
    path: file, directory, glob, or a list of these (.jsonl, .json, and their
      .gz / .zst compressed forms).
    text_field: the key holding the document text (default 'text').
    shard_seed: optional permutation seed for the file order.
  """

  suffixes = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".jsonl.zst",
              ".json.zst")

  def __init__(self, path, *, text_field: str = "text",
               shard_seed: int | None = None):
    self.paths = resolve_paths(path, self.suffixes, kind="JSON-lines",
                               shard_seed=shard_seed)
    self.text_field = text_field

  def documents(self) -> Iterator[Document]:
    return _utf8_documents(self.paths, self._file_documents)

  def _file_documents(self, path: str) -> Iterator[Document]:
    with _open_text(path) as f:
      for lineno, line in enumerate(f, 1):
        if not line.strip():
          continue
        try:
          record = json.loads(line)
        except json.JSONDecodeError as e:
          raise ValueError(
              f"{path}:{lineno}: not a JSON object ({e}); expected one "
              "JSON object per line."
          ) from e
        if not isinstance(record, dict) or self.text_field not in record:
          keys = sorted(record) if isinstance(record, dict) else type(record)
          raise ValueError(
              f"{path}:{lineno}: no field {self.text_field!r} (found keys "
              f"{keys}). Set `text_field` to the key holding the text."
          )
        text = record[self.text_field]
        if not isinstance(text, str):
          raise ValueError(
              f"{path}:{lineno}: field {self.text_field!r} is "
              f"{type(text).__name__}, expected a string."
          )
        if text:
          yield Document(text)

  def describe(self) -> str:
    return f"JsonlSource({self.text_field}; {_stat_id(self.paths)})"


class ParquetSource(Source):
  """Parquet files with a string column (SlimPajama / HF dataset shards).

  Args:
    path: file, directory (of .parquet files), glob, or a list of these.
    text_field: the column holding the text (default 'text').
    shard_seed: optional permutation seed for the file order.
    batch_rows: rows read per batch (bounds memory on big shards).
  """

  suffixes = (".parquet",)

  def __init__(self, path, *, text_field: str = "text",
               shard_seed: int | None = None, batch_rows: int = 1024):
    self.paths = resolve_paths(path, self.suffixes, kind="Parquet",
                               shard_seed=shard_seed)
    self.text_field = text_field
    self.batch_rows = batch_rows

  def documents(self) -> Iterator[Document]:
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
    for path in self.paths:
      pf = pq.ParquetFile(path)
      names = pf.schema_arrow.names
      if self.text_field not in names:
        raise ValueError(
            f"{path}: no column {self.text_field!r} (columns: {names}). Set "
            "`text_field` to the column holding the text."
        )
      for batch in pf.iter_batches(batch_size=self.batch_rows,
                                   columns=[self.text_field]):
        for text in batch.column(0).to_pylist():
          if text:
            yield Document(text)

  def describe(self) -> str:
    return f"ParquetSource({self.text_field}; {_stat_id(self.paths)})"


def _example_text(record: bytes, text_field: str) -> str | None:
  """Text of bytes feature `text_field` of a serialized tf.train.Example."""
  # The proto ships with tensorflow_datasets, so no TensorFlow is needed.
  # pylint: disable=g-import-not-at-top
  from google.protobuf import message
  from tensorflow_datasets.proto import tf_example_pb2
  # pylint: enable=g-import-not-at-top
  try:
    example = tf_example_pb2.Example.FromString(record)
  except message.DecodeError:
    return None
  feature = example.features.feature
  if text_field not in feature:
    return None
  values = feature[text_field].bytes_list.value
  # Not UTF-8: treated as not an Example of text; the caller's error says so.
  try:
    return b"".join(values).decode("utf-8") if values else ""
  except UnicodeDecodeError:
    return None


class ArrayRecordSource(Source):
  """ArrayRecord files (read with grain's ArrayRecordDataSource).

  Records are serialized tf.train.Example protos whose bytes feature
  `text_field` holds the text (TFDS / MaxText layout), or raw UTF-8 text.

  Args:
    path: file, directory, glob, or a list of these.
    text_field: the Example feature holding the text (default 'text').
    record_format: 'example', 'text', or 'auto' (decided from the first
      record of each file).
    shard_seed: optional permutation seed for the file order.
  """

  suffixes = (".array_record", ".arrayrecord")

  def __init__(self, path, *, text_field: str = "text",
               record_format: str = "auto", shard_seed: int | None = None):
    if record_format not in ("auto", "example", "text"):
      raise ValueError(
          f"record_format={record_format!r}: expected 'auto', "
          "'example' or 'text'."
      )
    # TFDS names its shards 'name-split.array_record-00000-of-00008', so the
    # suffix is not at the end: match it anywhere in a directory search.
    if not isinstance(path, (list, tuple)) and os.path.isdir(
        os.path.expanduser(os.fspath(path))):
      path = os.path.join(os.fspath(path), "**", "*.array_record*")
    self.paths = resolve_paths(path, self.suffixes, kind="ArrayRecord",
                               shard_seed=shard_seed)
    self.text_field = text_field
    self.record_format = record_format

  def _decode(self, path: str, record: bytes, fmt: str) -> tuple[str, str]:
    if fmt in ("auto", "example"):
      text = _example_text(record, self.text_field)
      if text is not None:
        return text, "example"
      if fmt == "example":
        raise ValueError(
            f"{path}: record is not a tf.train.Example with a UTF-8 bytes "
            f"feature {self.text_field!r}. Set `text_field` to the feature "
            "holding the text, or `record_format`='text'."
        )
    try:
      return record.decode("utf-8"), "text"
    except UnicodeDecodeError as e:
      raise ValueError(
          f"{path}: record is neither a tf.train.Example with feature "
          f"{self.text_field!r} nor UTF-8 text (set `text_field`, or "
          "re-encode the text records as UTF-8)."
      ) from e

  def documents(self) -> Iterator[Document]:
    import grain  # pylint: disable=g-import-not-at-top
    for path in self.paths:
      source = grain.sources.ArrayRecordDataSource([path])
      fmt = self.record_format
      # Batched reads: one random-access read per record is ~10x slower.
      for start in range(0, len(source), 256):
        indices = range(start, min(start + 256, len(source)))
        for record in source.__getitems__(indices):
          text, fmt = self._decode(path, record, fmt)
          if text:
            yield Document(text)

  def describe(self) -> str:
    return (f"ArrayRecordSource({self.text_field},{self.record_format}; "
            f"{_stat_id(self.paths)})")


def _first_words(message: str, limit: int = 300) -> str:
  """A one-line, bounded form of a library's error (drops long name lists)."""
  message = " ".join(message.split("Available datasets")[0].split())
  return message if len(message) <= limit else message[:limit] + "..."


class TfdsSource(Source):
  """A prepared TFDS dataset, read with `tfds.data_source` (random access).

  Nothing is ever downloaded (download=False): the dataset must already be
  prepared in ArrayRecord format under `data_dir`.

  Errors name the arguments as `make_source` calls them (tfds_name,
  tfds_split, tfds_data_dir).

  Args:
    name: TFDS name such as 'c4/en:3.0.1', or the path of a prepared dataset
      version directory (holding dataset_info.json).
    split: split name or slice ('train', 'validation', 'train[:10%]').
    data_dir: the TFDS data directory (None: TFDS's default,
      ~/tensorflow_datasets).
    text_field: the feature holding the text (default 'text').
  """

  def __init__(self, name: str, *, split: str = "train",
               data_dir: str | None = None, text_field: str = "text"):
    if not name:
      raise ValueError(
          "tfds_name is empty: set it to a prepared TFDS dataset name such "
          f"as 'c4/en:3.0.1' (with `tfds_data_dir`), {_SYNTHETIC_HINT}."
      )
    self.name, self.split, self.text_field = name, split, text_field
    self.data_dir = os.path.expanduser(data_dir) if data_dir else None
    self._source = self._open()

  def _open(self):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    hint = ("Prepare the dataset in ArrayRecord format (tfds build "
            "--file_format=array_record) and point `tfds_data_dir` at its "
            "data directory, or `tfds_name` at a prepared version "
            f"directory (nothing is downloaded), {_SYNTHETIC_HINT}.")
    if self.data_dir is not None and not os.path.isdir(self.data_dir):
      raise FileNotFoundError(
          f"tfds_data_dir={self.data_dir!r}: TFDS data directory not found "
          f"(dataset `tfds_name`={self.name!r}, split {self.split!r}). "
          f"{hint}")
    try:
      if os.path.isdir(os.path.expanduser(self.name)):
        builder = tfds.builder_from_directory(os.path.expanduser(self.name))
        return builder.as_data_source(split=self.split)
      return tfds.data_source(self.name, split=self.split,
                              data_dir=self.data_dir, download=False)
    except (FileNotFoundError, AssertionError, ValueError, KeyError,
            NotImplementedError, tfds.core.registered.DatasetNotFoundError
            ) as e:
      raise FileNotFoundError(
          f"tfds_name={self.name!r}: TFDS dataset not found or not readable "
          f"(split {self.split!r}, `tfds_data_dir`={self.data_dir!r}): "
          f"{type(e).__name__}: {_first_words(str(e))} {hint}"
      ) from e

  def documents(self) -> Iterator[Document]:
    for i in range(len(self._source)):
      record = self._source[i]
      if self.text_field not in record:
        raise ValueError(
            f"TFDS {self.name!r}: no feature {self.text_field!r} (features: "
            f"{sorted(record)}). Set `text_field`."
        )
      text = record[self.text_field]
      if isinstance(text, bytes):
        try:
          text = text.decode("utf-8")
        except UnicodeDecodeError as e:
          raise ValueError(
              f"TFDS {self.name!r}, split {self.split!r}, record {i}: "
              f"feature {self.text_field!r} is not UTF-8 text ({e.reason})."
          ) from e
      if text:
        yield Document(text)

  def describe(self) -> str:
    return (f"TfdsSource({self.name},{self.split},{self.text_field}; "
            f"{self.data_dir}; n={len(self._source)})")


# --------------------------------------------------------------------------
# Synthetic multi-domain corpus.

_DETS = ("the", "a", "every", "one", "some", "no", "that", "this")
_ADJS = ("small", "big", "red", "quiet", "old", "young", "brown", "happy",
         "lazy", "clever", "tiny", "grey", "wild", "gentle", "hungry", "shy")
_ANIMALS = ("cat", "dog", "bird", "horse", "mouse", "fox", "owl", "frog",
            "sheep", "goat", "rabbit", "wolf", "bear", "duck", "otter",
            "badger", "camel", "lizard", "pigeon", "donkey")
_VERBS = ("sees", "chases", "likes", "follows", "hears", "feeds", "finds",
          "watches", "greets", "ignores", "helps", "visits")
_REV_WORDS = ("water", "light", "stone", "river", "music", "paper", "window",
              "garden", "silver", "winter", "market", "forest", "bridge",
              "candle", "letter", "planet", "shadow", "island", "mirror",
              "thunder", "harbor", "meadow", "castle", "engine", "morning",
              "blanket", "kitchen", "pocket", "ladder", "orchard", "lantern",
              "village", "compass", "feather", "journey", "balcony", "violin",
              "pepper", "marble", "tunnel", "cabinet", "whisper", "quarry",
              "glacier", "saddle", "ribbon", "thimble", "dungeon")
_KEYS = ("id", "name", "city", "score", "level", "color")
_NAMES = ("alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi",
          "ivan", "judy", "mallory", "niaj", "olivia", "peggy", "rupert",
          "sybil")
_CITIES = ("paris", "lima", "oslo", "cairo", "delhi", "quito", "rome", "kyiv",
           "tokyo", "dakar", "hanoi", "bern", "accra", "dublin", "riga",
           "seoul")
_COLORS = ("amber", "teal", "ivory", "olive", "coral", "indigo", "maroon",
           "cyan", "khaki", "violet", "beige", "crimson")
_BASES = "ACGT"


# Each generator makes n sentences from a few vectorised draws: one rng call
# per field, not per word, keeps a 10k-document corpus to about a second.


def _arithmetic(rng: np.random.Generator, n: int) -> list[str]:
  a, b = rng.integers(0, 100, size=(2, n))
  ops = rng.integers(3, size=n)
  results = np.stack([a + b, a - b, a * b])[ops, np.arange(n)]
  return [f"{x} {'+-*'[o]} {y} = {c} ."
          for x, o, y, c in zip(a.tolist(), ops.tolist(), b.tolist(),
                                results.tolist())]


def _animals(rng: np.random.Generator, n: int) -> list[str]:
  lists = (_DETS, _ADJS, _ANIMALS, _VERBS, _DETS, _ADJS, _ANIMALS)
  picks = [rng.integers(len(xs), size=n).tolist() for xs in lists]
  return [" ".join(xs[i] for xs, i in zip(lists, row)) + " ."
          for row in zip(*picks)]


def _reversed(rng: np.random.Generator, n: int) -> list[str]:
  lengths = rng.integers(4, 9, size=n).tolist()
  words = rng.integers(len(_REV_WORDS), size=sum(lengths)).tolist()
  out, pos = [], 0
  for length in lengths:
    out.append(" ".join(_REV_WORDS[w][::-1]
                        for w in words[pos:pos + length]) + " .")
    pos += length
  return out


def _records(rng: np.random.Generator, n: int) -> list[str]:
  ids = rng.integers(10000, size=n).tolist()
  names = rng.integers(len(_NAMES), size=n).tolist()
  cities = rng.integers(len(_CITIES), size=n).tolist()
  scores = rng.integers(101, size=n).tolist()
  levels = rng.integers(1, 10, size=n).tolist()
  colors = rng.integers(len(_COLORS), size=n).tolist()
  keep = (rng.random(size=(n, len(_KEYS))) < 0.7).tolist()
  out = []
  for i in range(n):
    values = (f"{ids[i]:04d}", _NAMES[names[i]], _CITIES[cities[i]],
              str(scores[i]), str(levels[i]), _COLORS[colors[i]])
    fields = [f"{k}={v}" for j, (k, v) in enumerate(zip(_KEYS, values))
              if j == 0 or keep[i][j]]   # 'id' always comes first
    out.append(" ; ".join(fields) + " ;")
  return out


def _code(rng: np.random.Generator, n: int) -> list[str]:
  f, a, b = rng.integers(1, 20, size=(3, n)).tolist()
  ops = rng.integers(3, size=n).tolist()
  return [f"def f{f[i]}(x): return x {'+*-'[ops[i]]} {a[i]} if x > {b[i]} "
          "else x" for i in range(n)]


def _dna(rng: np.random.Generator, n: int) -> list[str]:
  lengths = rng.integers(8, 17, size=n).tolist()
  bases = rng.integers(4, size=sum(lengths)).tolist()
  out, pos = [], 0
  for length in lengths:
    out.append("".join(_BASES[b] for b in bases[pos:pos + length]) + " |")
    pos += length
  return out


# (name, generator of n sentences, separator between sentences)
SYNTHETIC_DOMAINS = (
    ("arithmetic", _arithmetic, " "),
    ("animals", _animals, " "),
    ("reversed", _reversed, " "),
    ("records", _records, "\n"),
    ("code", _code, "\n"),
    ("dna", _dna, " "),
)


class SyntheticSource(Source):
  """A built-in multi-domain corpus, deterministic from `seed`, no files.

  Domains (the first `num_domains` are used):
    0 arithmetic  correct statements such as '12 * 7 = 84 .'
    1 animals     a toy grammar: 'the small cat chases a red bird .'
    2 reversed    reversed English words: 'retaw thgil enots .'
    3 records     key=value records: 'id=0042 ; name=alice ; city=oslo ;'
    4 code        one-line Python-like functions
    5 dna         random ACGT strings

  Its text supports a SentencePiece BPE vocabulary of about 1000 pieces
  with 4 domains (800 with 3; 8000 with all 6, the dna strings merge
  freely); a larger vocabulary fails with a clear error.

  Document i draws its domain uniformly and its sentences from
  np.random.default_rng([seed, i]), so any document can be regenerated
  alone and the corpus is identical for a seed on every process.

  Args:
    num_docs: number of documents.
    num_domains: how many of the domains above to use (1..6).
    seed: corpus seed.
    min_sentences, max_sentences: sentences per document (inclusive).
  """

  def __init__(self, num_docs: int = 10000, *, num_domains: int = 4,
               seed: int = 0, min_sentences: int = 8,
               max_sentences: int = 32):
    if not 1 <= num_domains <= len(SYNTHETIC_DOMAINS):
      raise ValueError(
          f"num_domains={num_domains}: expected 1.."
          f"{len(SYNTHETIC_DOMAINS)} (domains: "
          f"{[d[0] for d in SYNTHETIC_DOMAINS]})."
      )
    if num_docs < 1:
      raise ValueError(
          f"num_docs={num_docs}: expected >= 1.")
    if not 1 <= min_sentences <= max_sentences:
      raise ValueError(
          f"min_sentences={min_sentences}, "
          f"max_sentences={max_sentences}: expected 1 <= min <= max."
      )
    self.num_docs, self.num_domains, self.seed = num_docs, num_domains, seed
    self.min_sentences, self.max_sentences = min_sentences, max_sentences
    self.domain_names = tuple(d[0] for d in SYNTHETIC_DOMAINS[:num_domains])

  def __len__(self) -> int:
    return self.num_docs

  def __getitem__(self, index: int) -> Document:
    if not 0 <= index < self.num_docs:
      raise IndexError(f"document {index} out of range [0, {self.num_docs})")
    rng = np.random.default_rng([self.seed, index])
    domain = int(rng.integers(self.num_domains))
    _, sentence, sep = SYNTHETIC_DOMAINS[domain]
    n = int(rng.integers(self.min_sentences, self.max_sentences + 1))
    return Document(sep.join(sentence(rng, n)), domain)

  def documents(self) -> Iterator[Document]:
    for i in range(self.num_docs):
      yield self[i]

  def describe(self) -> str:
    return (f"SyntheticSource(n={self.num_docs},domains={self.num_domains},"
            f"seed={self.seed},sentences={self.min_sentences}.."
            f"{self.max_sentences})")


class FilesSource(Source):
  """Text, JSON-lines and Parquet files, each read by its extension.

  The kind 'files': a directory of mixed shards works, and so does a single
  file of any of these kinds.

  Args:
    path: file, directory, glob, or a list of these.
    text_field: JSON key or Parquet column of the text (default 'text').
    doc_mode: documents of .txt files ('file', 'line' or 'paragraph').
    shard_seed: optional permutation seed for the file order.
  """

  readers = ((ParquetSource, ParquetSource.suffixes),
             (JsonlSource, JsonlSource.suffixes),
             (TextSource, TextSource.suffixes))

  def __init__(self, path, *, text_field: str = "text",
               doc_mode: str = "file", shard_seed: int | None = None):
    suffixes = tuple(s for _, group in self.readers for s in group)
    self.paths = resolve_paths(path, suffixes, kind="text/JSON-lines/Parquet",
                               shard_seed=shard_seed)
    self.text_field, self.doc_mode = text_field, doc_mode
    self._kinds = [self._reader(p, suffixes) for p in self.paths]

  def _reader(self, path: str, suffixes: Sequence[str]):
    for reader, group in self.readers:
      if path.endswith(group):
        return reader
    raise ValueError(
        f"path: {path!r} has an unknown extension; expected one of "
        f"{', '.join(suffixes)} (or set `kind`='array_record' for "
        "ArrayRecord files)."
    )

  def documents(self) -> Iterator[Document]:
    for path, reader in zip(self.paths, self._kinds):
      if reader is TextSource:
        source = TextSource(path, doc_mode=self.doc_mode)
      else:
        source = reader(path, text_field=self.text_field)
      yield from source.documents()

  def describe(self) -> str:
    return (f"FilesSource({self.text_field},{self.doc_mode}; "
            f"{_stat_id(self.paths)})")


# --------------------------------------------------------------------------
# Factory.

SOURCE_KINDS = ("synthetic", "files", "text", "jsonl", "parquet",
                "array_record", "tfds")


def make_source(kind: str, *, path=None, text_field: str = "text",
                doc_mode: str = "file", record_format: str = "auto",
                shard_seed: int | None = None, tfds_name: str = "",
                tfds_split: str = "train", tfds_data_dir: str | None = None,
                synthetic: dict | None = None) -> Source:
  """Builds a source of one of SOURCE_KINDS.

  Args:
    kind: one of SOURCE_KINDS.
    path: file / directory / glob (list allowed) for the file kinds.
    text_field: JSON key, Parquet column or Example feature of the text.
    doc_mode: documents of a text source: 'file', 'line' or 'paragraph'.
    record_format: ArrayRecord records: 'auto', 'example' or 'text'.
    shard_seed: optional file-order permutation seed.
    tfds_name, tfds_split, tfds_data_dir: the TFDS dataset.
    synthetic: kwargs of SyntheticSource (num_docs, num_domains, seed, ...).

  Returns:
    A Source.

  Raises:
    FileNotFoundError: a file kind without `path`, or `path` matches no file.
    ValueError: an unknown kind or an invalid setting. Messages start with
      the argument at fault ('kind=...', 'path=...').
  """
  if kind == "synthetic":
    return SyntheticSource(**(synthetic or {}))
  if kind == "tfds":
    return TfdsSource(tfds_name, split=tfds_split, data_dir=tfds_data_dir,
                      text_field=text_field)
  if kind in ("files", "text", "jsonl", "parquet", "array_record"):
    if path is None or path == "" or path == []:
      raise FileNotFoundError(
          f"kind={kind!r} needs `path`: set it to a file, a directory or "
          f"a glob pattern, {_SYNTHETIC_HINT}."
      )
  if kind == "files":
    return FilesSource(path, text_field=text_field, doc_mode=doc_mode,
                       shard_seed=shard_seed)
  if kind == "text":
    return TextSource(path, doc_mode=doc_mode, shard_seed=shard_seed)
  if kind == "jsonl":
    return JsonlSource(path, text_field=text_field, shard_seed=shard_seed)
  if kind == "parquet":
    return ParquetSource(path, text_field=text_field, shard_seed=shard_seed)
  if kind == "array_record":
    return ArrayRecordSource(path, text_field=text_field,
                             record_format=record_format,
                             shard_seed=shard_seed)
  raise ValueError(
      f"kind={kind!r}: expected one of {SOURCE_KINDS}.")
