"""SentencePiece tokenizer: load a model, or train a BPE one and cache it.

Loading and training are two requests, two functions:

  load_tokenizer(model_path)            an existing `.model` (any
                                        SentencePiece model, e.g. unigram);
                                        a missing file is an error, never a
                                        reason to train one there
  train_or_reuse_tokenizer(workdir, texts, vocab_size=...)
                                        `<workdir>/tokenizer_bpe<V>.model`:
                                        trained on first use, reused after

LibMoE's LM stack (algorithms.md §6.3) trains a SentencePiece BPE model with
an 8000-piece vocabulary and split_digits=True on the training text, with the
literal text '<STORY_SEP>' after each document (plain text, no special
token); `train_or_reuse_tokenizer` does the same.

Ids: unk 0, bos 1, eos 2 (SentencePiece defaults); the pipeline adds neither
bos nor eos, only the document separator text.

Errors name the argument at fault ('model_path=...', 'vocab_size=...');
moe_jax/data/from_config.py maps the names to config fields.
"""

from __future__ import annotations

import io
import os
import tempfile
import time
from typing import Iterable, Iterator, Sequence

from absl import logging
import numpy as np

DOC_SEPARATOR = "<STORY_SEP>"
DEFAULT_VOCAB_SIZE = 8000
# Training text cap: enough for a stable 8k vocabulary, bounded memory.
DEFAULT_MAX_TRAIN_CHARS = 100_000_000
# SentencePiece skips "sentences" longer than max_sentence_length bytes, so
# long lines are cut into pieces of at most this many characters.
_MAX_PIECE_CHARS = 4096


class SentencePieceTokenizer:
  """A loaded SentencePiece model with list-of-int encode/decode helpers.

  Args:
    model_path: path of a `.model` file.

  Raises:
    FileNotFoundError: no file at `model_path`.
    ValueError: the file is not a SentencePiece model.
  """

  def __init__(self, model_path: str | os.PathLike):
    import sentencepiece as spm  # pylint: disable=g-import-not-at-top
    self.path = os.path.expanduser(os.fspath(model_path))
    if not os.path.isfile(self.path):
      raise FileNotFoundError(
          f"model_path={self.path!r}: no SentencePiece model file there "
          f"(looked for {os.path.abspath(self.path)!r}). Point `model_path` "
          "at an existing .model file."
      )
    try:
      self._sp = spm.SentencePieceProcessor(model_file=self.path)
    except RuntimeError as e:
      raise ValueError(
          f"model_path={self.path!r}: not a SentencePiece model file ({e})."
      ) from e

  @property
  def vocab_size(self) -> int:
    """Number of pieces: the model's embedding rows."""
    return self._sp.get_piece_size()

  def encode(self, text: str) -> list[int]:
    """Text -> ids [N] (no bos/eos)."""
    return self._sp.encode(text, out_type=int)

  def encode_batch(self, texts: Sequence[str],
                   num_threads: int = -1) -> list[list[int]]:
    """Texts -> one id list per text, encoded in parallel C++ threads."""
    return self._sp.encode(list(texts), out_type=int, num_threads=num_threads)

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """Ids [N] -> text."""
    return self._sp.decode([int(i) for i in np.asarray(ids).reshape(-1)])

  def pieces(self, text: str) -> list[str]:
    """Text -> the piece strings, for inspection."""
    return self._sp.encode(text, out_type=str)

  def id_to_piece(self, index: int) -> str:
    return self._sp.id_to_piece(index)

  def fingerprint(self) -> str:
    """sha256 of the model file: keys token caches to this exact model."""
    import hashlib  # pylint: disable=g-import-not-at-top
    with open(self.path, "rb") as f:
      return hashlib.sha256(f.read()).hexdigest()

  def __repr__(self) -> str:
    return f"SentencePieceTokenizer({self.path!r}, vocab={self.vocab_size})"


def training_sentences(texts: Iterable[str], *, max_chars: int,
                       separator: str = DOC_SEPARATOR) -> Iterator[str]:
  """Lines of the training text, capped at `max_chars` characters in total.

  Each document gets `separator` appended (as the pipeline encodes it), is
  split into non-empty lines, and lines longer than 4096 characters are cut,
  since SentencePiece drops over-long sentences silently.
  """
  total = 0
  for text in texts:
    for line in (text + separator).split("\n"):
      if not line.strip():
        continue
      for start in range(0, len(line), _MAX_PIECE_CHARS):
        piece = line[start:start + _MAX_PIECE_CHARS]
        yield piece
        total += len(piece)
        if total >= max_chars:
          return


def train_sentencepiece(
    texts: Iterable[str],
    model_path: str | os.PathLike,
    *,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    model_type: str = "bpe",
    split_digits: bool = True,
    max_chars: int = DEFAULT_MAX_TRAIN_CHARS,
    character_coverage: float = 0.9999,
    byte_fallback: bool = False,
    separator: str = DOC_SEPARATOR,
    num_threads: int | None = None,
) -> str:
  """Trains a SentencePiece model on `texts` and writes it to `model_path`.

  The file is written to a temporary name and renamed, so a concurrent
  reader (another process) never sees a partial model.

  Args:
    texts: documents (strings), e.g. a Source.
    model_path: where to write the `.model` file.
    vocab_size: number of pieces (LibMoE: 8000).
    model_type: 'bpe' (LibMoE) or 'unigram'.
    split_digits: every digit is its own piece (LibMoE: True). The ten
      digits are always added to the alphabet, so numbers never become unk
      even when the training text has none.
    max_chars: cap on the characters of training text read from `texts`.
    character_coverage: fraction of characters covered by the alphabet.
    byte_fallback: encode unknown characters as UTF-8 byte pieces (needs
      vocab_size > 256 + alphabet).
    separator: appended to each document, as the pipeline does.
    num_threads: trainer threads (default: the CPU count).

  Returns:
    The model path.

  Raises:
    ValueError: no training text, or a vocabulary the text cannot support.
  """
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  model_path = os.fspath(model_path)
  logging.info("training a SentencePiece %s tokenizer (vocab %d) on %s -> %s",
               model_type, vocab_size, _describe(texts), model_path)
  start = time.perf_counter()
  sentences = list(training_sentences(texts, max_chars=max_chars,
                                      separator=separator))
  if not sentences:
    raise ValueError(
        "texts: no training text (the source yielded no non-empty line), "
        "so no SentencePiece model can be trained. Give a source with text, "
        "or load an existing .model instead."
    )
  buf = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=buf,
        vocab_size=vocab_size,
        model_type=model_type,
        split_digits=split_digits,
        required_chars="0123456789" if split_digits else "",
        character_coverage=character_coverage,
        byte_fallback=byte_fallback,
        max_sentence_length=4 * _MAX_PIECE_CHARS + 16,
        num_threads=num_threads or os.cpu_count() or 1,
        minloglevel=2,
    )
  except RuntimeError as e:
    raise ValueError(
        f"vocab_size={vocab_size}: SentencePiece training failed on "
        f"{len(sentences)} lines of text: {e}. A small corpus supports only "
        "a small vocabulary: lower `vocab_size`."
    ) from e
  directory = os.path.dirname(os.path.abspath(model_path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, suffix=".model.tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(buf.getvalue())
    os.replace(tmp, model_path)
  except BaseException:
    # No half-written temporary file left next to the models.
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  logging.info("trained the SentencePiece tokenizer %s in %.1f s (%d lines, "
               "%d characters of text)", model_path,
               time.perf_counter() - start, len(sentences),
               sum(len(x) for x in sentences))
  return model_path


def _describe(texts: Iterable[str], limit: int = 120) -> str:
  """A short description of the training text for the log."""
  describe = getattr(texts, "describe", None)
  text = describe() if describe else f"{type(texts).__name__} of texts"
  return text if len(text) <= limit else text[:limit] + "...)"


def default_model_path(workdir: str | os.PathLike, vocab_size: int,
                       model_type: str = "bpe") -> str:
  """The cached model's path in a workdir: the vocabulary is in the name."""
  return os.path.join(os.fspath(workdir),
                      f"tokenizer_{model_type}{vocab_size}.model")


def load_tokenizer(model_path: str | os.PathLike) -> SentencePieceTokenizer:
  """Loads an existing `.model` file; never trains one.

  Args:
    model_path: the `.model` file ('~' is expanded).

  Returns:
    The tokenizer, with the model's own vocabulary size.

  Raises:
    FileNotFoundError: no file at `model_path` (a typo'd path must not
      silently train a new tokenizer and write it there).
    ValueError: the file is not a SentencePiece model.
  """
  tokenizer = SentencePieceTokenizer(model_path)
  logging.info("loaded tokenizer %s (vocab %d)", tokenizer.path,
               tokenizer.vocab_size)
  return tokenizer


def train_or_reuse_tokenizer(
    workdir: str | os.PathLike,
    texts: Iterable[str],
    *,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    model_type: str = "bpe",
    **train_kwargs,
) -> SentencePieceTokenizer:
  """The workdir's own tokenizer: trained on first use, reused afterwards.

  The model lives at `default_model_path(workdir, vocab_size, model_type)`,
  `<workdir>/tokenizer_bpe<vocab>.model`; a resumed run finds it there and
  trains nothing. The file appears atomically (`train_sentencepiece`), so
  an existing one is complete.

  Args:
    workdir: the run's directory.
    texts: training documents (e.g. the training Source); read only when the
      model must be trained.
    vocab_size: vocabulary of the model (LibMoE: 8000).
    model_type: 'bpe' (LibMoE) or 'unigram'.
    **train_kwargs: forwarded to `train_sentencepiece` (split_digits,
      separator, max_chars, ...).

  Returns:
    The loaded tokenizer.

  Raises:
    ValueError: no training text, or a vocabulary the text cannot support.
  """
  path = default_model_path(workdir, vocab_size, model_type)
  if os.path.isfile(path):
    logging.info("reusing the workdir's tokenizer %s", path)
  else:
    train_sentencepiece(texts, path, vocab_size=vocab_size,
                        model_type=model_type, **train_kwargs)
  return load_tokenizer(path)
