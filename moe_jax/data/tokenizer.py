"""Tokenizers: SentencePiece (load, or train a BPE one and cache it) and the
tokenizer files of a Hugging Face model directory.

Loading and training are two requests, two functions:

  load_tokenizer(model_path)            an existing `.model` (any
                                        SentencePiece model, e.g. unigram);
                                        a missing file is an error, never a
                                        reason to train one there
  train_or_reuse_tokenizer(workdir, texts, vocab_size=...)
                                        `<workdir>/tokenizer_bpe<V>.model`:
                                        trained on first use, reused after
  load_hf_tokenizer(model_dir)          `<model_dir>/tokenizer.json` (+
                                        tokenizer_config.json) of an
                                        imported HF model, read offline

LibMoE's LM stack (algorithms.md §6.3) trains a SentencePiece BPE model with
an 8000-piece vocabulary and split_digits=True on the training text, with the
literal text '<STORY_SEP>' after each document (plain text, no special
token); `train_or_reuse_tokenizer` does the same.

Ids: SentencePiece unk 0, bos 1, eos 2 (its defaults); an HF tokenizer's
bos/eos are the tokens its tokenizer_config.json names. Neither tokenizer adds
bos or eos when encoding; the pipeline adds only the document separator text.

Errors name the argument at fault ('model_path=...', 'model_dir=...',
'vocab_size=...'); moe_jax/data/from_config.py maps the names to config
fields.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import time
from typing import Any, Iterable, Iterator, Protocol, Sequence

from absl import logging
import numpy as np

DOC_SEPARATOR = "<STORY_SEP>"
# Values of config.data.tokenizer_type: how config.data.tokenizer is read.
TOKENIZER_TYPES = ("sentencepiece", "hf")
DEFAULT_VOCAB_SIZE = 8000
# Training text cap: enough for a stable 8k vocabulary, bounded memory.
DEFAULT_MAX_TRAIN_CHARS = 100_000_000
# SentencePiece skips "sentences" longer than max_sentence_length bytes, so
# long lines are cut into pieces of at most this many characters.
_MAX_PIECE_CHARS = 4096


class Tokenizer(Protocol):
  """What the data modules need from a tokenizer (both classes here fit).

  Optional, used when present: `encode_batch(texts) -> list[list[int]]`
  (see `encode_many`), `vocab_size` (the pipeline's token dtype) and
  `bos_id` (int or None; conversations start with it).
  """

  def encode(self, text: str) -> list[int]:
    ...


def encode_many(tokenizer: Tokenizer,
                texts: Sequence[str]) -> list[list[int]]:
  """Texts -> one id list per text.

  Uses the tokenizer's `encode_batch` when it has one (C++ / Rust threads,
  several times faster on many texts), else `encode` on each text; a single
  text skips the batch call's thread-pool overhead.
  """
  texts = list(texts)
  encode_batch = getattr(tokenizer, "encode_batch", None)
  if encode_batch is not None and len(texts) > 1:
    return list(encode_batch(texts))
  return [tokenizer.encode(t) for t in texts]


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

  @property
  def bos_id(self) -> int | None:
    """Id of the bos piece, None when the model has none."""
    index = self._sp.bos_id()
    return index if index >= 0 else None

  @property
  def eos_id(self) -> int | None:
    """Id of the eos piece, None when the model has none."""
    index = self._sp.eos_id()
    return index if index >= 0 else None

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


# The files of an HF model directory that define its tokenizer.
HF_TOKENIZER_FILE = "tokenizer.json"
HF_TOKENIZER_CONFIG = "tokenizer_config.json"
# Read only for special tokens tokenizer_config.json does not name: older
# transformers wrote them there (transformers 5 still reads it).
_HF_SPECIAL_TOKENS_MAP = "special_tokens_map.json"
# transformers' named special tokens (SPECIAL_TOKENS_ATTRIBUTES).
_HF_SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token",
                     "pad_token", "cls_token", "mask_token")


class HFTokenizer:
  """The tokenizer of a Hugging Face model directory, loaded offline.

  Reads `tokenizer.json` with the `tokenizers` library (no transformers
  import, no network) and gives the ids `transformers.AutoTokenizer` gives
  for that directory with `add_special_tokens=False`, for tokenizer classes
  that use tokenizer.json as saved (TokenizersBackend, PreTrainedTokenizerFast
  and model classes without their own constructor):
    - truncation and padding saved in tokenizer.json are switched off, as
      transformers' encode does: either would silently cut or pad documents;
    - named special tokens of tokenizer_config.json (bos_token, pad_token,
      ...) missing from tokenizer.json are added as special tokens, as
      transformers does on load, so ids and `vocab_size` agree with it.

  Args:
    model_dir: the directory holding tokenizer.json ('~' is expanded).

  Raises:
    FileNotFoundError: `model_dir` has no tokenizer.json.
    ValueError: `model_dir` is a file, or a tokenizer file is unreadable.
  """

  def __init__(self, model_dir: str | os.PathLike):
    import tokenizers  # pylint: disable=g-import-not-at-top
    self.path = os.path.expanduser(os.fspath(model_dir))
    file = os.path.join(self.path, HF_TOKENIZER_FILE)
    if os.path.isfile(self.path):
      raise ValueError(
          f"model_dir={self.path!r}: a file, not a directory. Point "
          f"`model_dir` at the Hugging Face model directory that holds "
          f"{HF_TOKENIZER_FILE} (and {HF_TOKENIZER_CONFIG})."
      )
    if not os.path.isfile(file):
      raise FileNotFoundError(
          f"model_dir={self.path!r}: no {HF_TOKENIZER_FILE} there (looked "
          f"for {os.path.abspath(file)!r}). Point `model_dir` at a Hugging "
          f"Face model directory with {HF_TOKENIZER_FILE} and "
          f"{HF_TOKENIZER_CONFIG}. (A directory with only a SentencePiece "
          "tokenizer.model: load it with transformers.AutoTokenizer and "
          f"save_pretrained() it, which writes {HF_TOKENIZER_FILE}.)"
      )
    try:
      self._tk = tokenizers.Tokenizer.from_file(file)
    except Exception as e:  # pylint: disable=broad-except
      # tokenizers raises a bare Exception for a malformed file.
      raise ValueError(
          f"model_dir={self.path!r}: {file} is not a tokenizers file ({e})."
      ) from e
    self._tk.no_truncation()
    self._tk.no_padding()
    self.special_tokens = self._special_tokens()
    missing = [t for t in self.special_tokens.values()
               if self._tk.token_to_id(t) is None]
    if missing:
      # dict.fromkeys: one token may serve as two (pad = eos).
      self._tk.add_special_tokens(list(dict.fromkeys(missing)))

  def _read_json(self, name: str) -> dict[str, Any]:
    """A JSON file of the directory, {} when absent."""
    path = os.path.join(self.path, name)
    if not os.path.isfile(path):
      return {}
    try:
      with open(path, encoding="utf-8") as f:
        value = json.load(f)
    except (OSError, ValueError) as e:
      raise ValueError(
          f"model_dir={self.path!r}: cannot read {path} ({e})."
      ) from e
    if not isinstance(value, dict):
      raise ValueError(f"model_dir={self.path!r}: {path} holds a "
                       f"{type(value).__name__}, expected a JSON object.")
    return value

  def _special_tokens(self) -> dict[str, str]:
    """{name: token text} of the named special tokens the files declare."""
    config = self._read_json(HF_TOKENIZER_CONFIG)
    legacy = self._read_json(_HF_SPECIAL_TOKENS_MAP)
    tokens = {}
    for name in _HF_SPECIAL_NAMES:
      value = config.get(name, legacy.get(name))
      # Saved as the text, or as a serialized AddedToken {'content': ...}.
      if isinstance(value, dict):
        value = value.get("content")
      if isinstance(value, str) and value:
        tokens[name] = value
    return tokens

  def _special_id(self, name: str) -> int | None:
    token = self.special_tokens.get(name)
    return None if token is None else self.token_to_id(token)

  def token_to_id(self, token: str) -> int | None:
    """Id of a token's exact text (added tokens included), None when the
    vocabulary has no such token (the text is not encoded)."""
    return self._tk.token_to_id(token)

  @property
  def vocab_size(self) -> int:
    """len(tokenizer): the base vocabulary plus added tokens."""
    return self._tk.get_vocab_size(with_added_tokens=True)

  def __len__(self) -> int:
    return self.vocab_size

  @property
  def bos_id(self) -> int | None:
    """Id of tokenizer_config.json's bos_token, None when it names none."""
    return self._special_id("bos_token")

  @property
  def eos_id(self) -> int | None:
    """Id of tokenizer_config.json's eos_token, None when it names none."""
    return self._special_id("eos_token")

  def encode(self, text: str) -> list[int]:
    """Text -> ids [N]; no bos/eos (the post-processor is not applied)."""
    return self._tk.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    """Texts -> one id list per text, encoded in parallel Rust threads."""
    # The _fast variant (tokenizers >= 0.21) skips the character offsets,
    # which nothing here reads.
    encode = getattr(self._tk, "encode_batch_fast", self._tk.encode_batch)
    encodings = encode(list(texts), add_special_tokens=False)
    return [e.ids for e in encodings]

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """Ids [N] -> text, special tokens kept (as the ids say)."""
    return self._tk.decode([int(i) for i in np.asarray(ids).reshape(-1)],
                           skip_special_tokens=False)

  def pieces(self, text: str) -> list[str]:
    """Text -> the token strings, for inspection."""
    return self._tk.encode(text, add_special_tokens=False).tokens

  def id_to_piece(self, index: int) -> str:
    return self._tk.id_to_token(index)

  def fingerprint(self) -> str:
    """sha256 of the tokenizer files: keys token caches to these files."""
    digest = hashlib.sha256()
    for name in (HF_TOKENIZER_FILE, HF_TOKENIZER_CONFIG,
                 _HF_SPECIAL_TOKENS_MAP):
      path = os.path.join(self.path, name)
      if os.path.isfile(path):
        with open(path, "rb") as f:
          digest.update(name.encode() + b"\0" + f.read())
    return digest.hexdigest()

  def __repr__(self) -> str:
    return f"HFTokenizer({self.path!r}, vocab={self.vocab_size})"


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


def load_hf_tokenizer(model_dir: str | os.PathLike) -> HFTokenizer:
  """Loads the tokenizer files of a Hugging Face model directory, offline.

  Args:
    model_dir: the directory with tokenizer.json and tokenizer_config.json
      ('~' is expanded).

  Returns:
    The tokenizer; its vocab_size counts added tokens (len(tokenizer)).

  Raises:
    FileNotFoundError: no tokenizer.json in `model_dir`.
    ValueError: `model_dir` is a file, or a tokenizer file is unreadable.
  """
  tokenizer = HFTokenizer(model_dir)
  logging.info("loaded the HF tokenizer %s (vocab %d, bos %s, eos %s)",
               tokenizer.path, tokenizer.vocab_size, tokenizer.bos_id,
               tokenizer.eos_id)
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
