"""SentencePiece tokenizer: train a BPE model from a source, cache it, load it.

LibMoE's LM stack (algorithms.md §6.3) trains a SentencePiece BPE model with
an 8000-piece vocabulary and split_digits=True on the training text, with the
literal text '<STORY_SEP>' after each document (plain text, no special
token). `load_or_train_tokenizer` does the same on first use and reuses the
cached `.model` file afterwards; an existing `.model` (any SentencePiece
model, e.g. a unigram one) can also be loaded as is.

Ids: unk 0, bos 1, eos 2 (SentencePiece defaults); the pipeline adds neither
bos nor eos, only the document separator text.
"""

from __future__ import annotations

import io
import os
import tempfile
from typing import Iterable, Iterator, Sequence

import numpy as np

DOC_SEPARATOR = "<STORY_SEP>"
DEFAULT_VOCAB_SIZE = 8000
# Training text cap: enough for a stable 8k vocabulary, bounded memory.
DEFAULT_MAX_TRAIN_CHARS = 100_000_000
# SentencePiece skips "sentences" longer than max_sentence_length bytes, so
# long lines are cut into pieces of at most this many characters.
_MAX_PIECE_CHARS = 4096
# Config fields named in error messages (moe_jax/config_lib.py).
PATH_FIELD = "config.data.tokenizer"
VOCAB_FIELD = "config.data.vocab_size"


class SentencePieceTokenizer:
  """A loaded SentencePiece model with list-of-int encode/decode helpers.

  Args:
    model_path: path of a `.model` file.
  """

  def __init__(self, model_path: str | os.PathLike):
    import sentencepiece as spm  # pylint: disable=g-import-not-at-top
    self.path = os.fspath(model_path)
    if not os.path.isfile(self.path):
      raise FileNotFoundError(
          f"{PATH_FIELD}={self.path!r}: no SentencePiece model file there. "
          f"Point {PATH_FIELD} at an existing .model, or leave it empty to "
          "train one into the workdir."
      )
    self._sp = spm.SentencePieceProcessor(model_file=self.path)

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
  sentences = list(training_sentences(texts, max_chars=max_chars,
                                      separator=separator))
  if not sentences:
    raise ValueError(
        "Cannot train the SentencePiece model: the training source yielded "
        f"no text. Check config.data.train_path, or set {PATH_FIELD} to an "
        "existing .model."
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
        f"SentencePiece training failed with {VOCAB_FIELD}={vocab_size} "
        f"on {len(sentences)} lines of text: {e}. A small corpus supports "
        f"only a small vocabulary: lower {VOCAB_FIELD}."
    ) from e
  directory = os.path.dirname(os.path.abspath(model_path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, suffix=".model.tmp")
  with os.fdopen(fd, "wb") as f:
    f.write(buf.getvalue())
  os.replace(tmp, model_path)
  return model_path


def default_model_path(workdir: str | os.PathLike, vocab_size: int,
                       model_type: str = "bpe") -> str:
  """The cached model's path in a workdir: the vocabulary is in the name."""
  return os.path.join(os.fspath(workdir),
                      f"tokenizer_{model_type}{vocab_size}.model")


def load_or_train_tokenizer(
    *,
    model_path: str | os.PathLike | None = None,
    workdir: str | os.PathLike | None = None,
    texts: Iterable[str] | None = None,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    **train_kwargs,
) -> SentencePieceTokenizer:
  """Loads a cached / given `.model`, or trains one and caches it.

  Order: `model_path` if the file exists; else the workdir cache
  `<workdir>/tokenizer_bpe<vocab>.model` if it exists; else train on
  `texts` and write to `model_path` (or the workdir cache path).

  Args:
    model_path: an existing `.model` to load, or where to write a new one.
    workdir: where to cache the trained model when `model_path` is not set.
    texts: training documents (e.g. the training Source); read only when a
      model must be trained.
    vocab_size: vocabulary of a newly trained model (an existing model keeps
      its own size; read `.vocab_size`).
    **train_kwargs: forwarded to `train_sentencepiece`.

  Returns:
    The loaded tokenizer.

  Raises:
    ValueError: no model exists and there is nowhere to write one, or no
      training text.
  """
  if model_path:
    path = os.path.expanduser(os.fspath(model_path))
  elif workdir:
    path = default_model_path(workdir, vocab_size,
                              train_kwargs.get("model_type", "bpe"))
  else:
    raise ValueError(
        f"No tokenizer: set {PATH_FIELD} to a .model file (existing, or where "
        "to write a trained one), or give a workdir to cache one in."
    )
  if not os.path.isfile(path):
    if texts is None:
      raise FileNotFoundError(
          f"{PATH_FIELD}={path!r} does not exist and no training text was "
          f"given. Point {PATH_FIELD} at an existing .model, or train one "
          "from the training source."
      )
    train_sentencepiece(texts, path, vocab_size=vocab_size, **train_kwargs)
  return SentencePieceTokenizer(path)
