"""SentencePiece training, caching and loading (small vocabularies)."""

import logging
import os
import re

import pytest

from tests.data.conftest import SHARED_DATA
from moe_jax.data import sources as sources_lib
from moe_jax.data import tokenizer as tokenizer_lib


@pytest.fixture(scope="module")
def training_text():
  """(source, sample text): tinyshakespeare, else the synthetic corpus."""
  path = SHARED_DATA / "tinyshakespeare.txt"
  if path.is_file():
    # One document per paragraph: many separators, as in a real corpus.
    return (sources_lib.TextSource(str(path), doc_mode="paragraph"),
            "First Citizen:\nBefore we proceed any further, hear me speak.")
  # Without ../shared/data the same checks run on the built-in corpus.
  source = sources_lib.SyntheticSource(400, seed=0)
  return source, source[1].text[:200]


def test_trains_bpe_with_split_digits_and_caches(training_text, tmp_path,
                                                 monkeypatch):
  source, text = training_text
  tok = tokenizer_lib.train_or_reuse_tokenizer(
      tmp_path, source, vocab_size=300, max_chars=300_000)
  path = tmp_path / "tokenizer_bpe300.model"
  assert tok.path == str(path) and path.is_file()
  assert tok.vocab_size == 300

  # split_digits: no piece holds two digits, and each digit of a number is
  # its own token (tinyshakespeare has no digits at all).
  assert not any(re.search(r"\d\D*\d", tok.id_to_piece(i))
                 for i in range(tok.vocab_size))
  pieces = tok.pieces("In 1599 there were 42 kings.")
  digits = [p.lstrip("\u2581") for p in pieces if re.search(r"\d", p)]
  assert digits == ["1", "5", "9", "9", "4", "2"]
  assert tok.id_to_piece(0) == "<unk>"
  assert tok.encode("1599").count(0) == 0   # digits are in the alphabet

  ids = tok.encode(text)
  assert tok.decode(ids) == text.replace("\n", " ")  # nmt_nfkc folds '\n'
  assert len(ids) < len(text) / 1.5   # BPE merges, not characters
  assert tok.encode_batch([text, "speak"])[0] == ids

  # Second call: the cached file is loaded, nothing is trained.
  mtime = os.path.getmtime(path)
  def no_training(*args, **kwargs):
    raise AssertionError("trained again instead of reusing the cache")
  monkeypatch.setattr(tokenizer_lib, "train_sentencepiece", no_training)
  again = tokenizer_lib.train_or_reuse_tokenizer(
      tmp_path, source, vocab_size=300)
  assert again.path == str(path) and os.path.getmtime(path) == mtime
  assert again.encode(text) == ids


def test_training_is_deterministic_and_writes_given_path(tmp_path):
  texts = list(sources_lib.SyntheticSource(300, seed=0))
  a = tokenizer_lib.train_sentencepiece(texts, tmp_path / "a.model",
                                        vocab_size=200)
  b = tokenizer_lib.train_sentencepiece(texts, tmp_path / "sub/b.model",
                                        vocab_size=200)
  with open(a, "rb") as fa, open(b, "rb") as fb:
    assert fa.read() == fb.read()
  tok = tokenizer_lib.load_tokenizer(b)
  assert tok.vocab_size == 200   # an existing model keeps its own size
  # The separator is plain text, tokenized as the pipeline appends it.
  sep = tok.encode(texts[0] + tokenizer_lib.DOC_SEPARATOR)
  assert tok.decode(sep).endswith("<STORY_SEP>")
  assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_loads_an_existing_model(shared_data):
  path = shared_data / "tokenizers" / "maxtext_c4_en_unigram_32768.model"
  if not path.is_file():
    pytest.skip(f"{path} not found")
  tok = tokenizer_lib.load_tokenizer(path)
  assert tok.vocab_size == 32768
  assert tok.decode(tok.encode("Hello world")) == "Hello world"


def test_errors_name_the_argument(tmp_path):
  missing = tmp_path / "missing.model"
  with pytest.raises(FileNotFoundError,
                     match=f"^model_path='{re.escape(str(missing))}': no "):
    tokenizer_lib.load_tokenizer(missing)
  with pytest.raises(FileNotFoundError, match="^model_path="):
    tokenizer_lib.SentencePieceTokenizer(tmp_path / "nope.model")
  garbage = tmp_path / "garbage.model"
  garbage.write_bytes(b"not a model")
  with pytest.raises(ValueError, match="^model_path=.*not a SentencePiece"):
    tokenizer_lib.load_tokenizer(garbage)
  # A corpus too small for the vocabulary: the message says which argument.
  with pytest.raises(ValueError, match=r"^vocab_size=5000: .*`vocab_size`"):
    tokenizer_lib.train_sentencepiece(["a tiny text"] * 5,
                                      tmp_path / "t.model", vocab_size=5000)
  with pytest.raises(ValueError, match="^texts: no training text"):
    tokenizer_lib.train_sentencepiece([], tmp_path / "e.model")


def test_load_never_trains_at_a_missing_path(tmp_path, monkeypatch):
  """A typo'd model path is an error, not a new tokenizer written there."""
  def no_training(*args, **kwargs):
    raise AssertionError("trained a tokenizer for a load request")
  monkeypatch.setattr(tokenizer_lib, "train_sentencepiece", no_training)
  typo = tmp_path / "typo" / "c4.model"
  with pytest.raises(FileNotFoundError, match="typo/c4.model"):
    tokenizer_lib.load_tokenizer(typo)
  assert not typo.parent.exists()


def test_training_and_reuse_are_logged(tmp_path, caplog):
  texts = list(sources_lib.SyntheticSource(300, seed=0))
  with caplog.at_level(logging.INFO):
    tokenizer_lib.train_or_reuse_tokenizer(tmp_path, texts, vocab_size=200)
  log = caplog.text
  path = str(tmp_path / "tokenizer_bpe200.model")
  assert re.search(r"training a SentencePiece bpe tokenizer \(vocab 200\) "
                   f"on .* -> {re.escape(path)}", log)
  assert re.search(r"trained the SentencePiece tokenizer .* in [\d.]+ s", log)
  caplog.clear()
  with caplog.at_level(logging.INFO):
    tokenizer_lib.train_or_reuse_tokenizer(tmp_path, texts, vocab_size=200)
  assert f"reusing the workdir's tokenizer {path}" in caplog.text
  assert "training a SentencePiece" not in caplog.text


class _Counting:
  """encode / encode_batch that record which one ran."""

  def __init__(self, batch):
    self.calls = []
    if batch:
      self.encode_batch = self._encode_batch

  def encode(self, text):
    self.calls.append("encode")
    return [len(text)]

  def _encode_batch(self, texts):
    self.calls.append("encode_batch")
    return [[len(t)] for t in texts]


@pytest.mark.parametrize("batch", [True, False])
def test_encode_many_uses_encode_batch_when_present(batch):
  tok = _Counting(batch)
  assert tokenizer_lib.encode_many(tok, ["ab", "c"]) == [[2], [1]]
  assert tok.calls == (["encode_batch"] if batch else ["encode"] * 2)
  tok.calls.clear()
  # A single text skips the batch call.
  assert tokenizer_lib.encode_many(tok, ["abc"]) == [[3]]
  assert tok.calls == ["encode"]
