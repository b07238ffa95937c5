"""Packing, shuffling, per-process slicing and exact resume of the pipeline."""

import json
import logging
import re

import numpy as np
import pytest

from moe_jax.data import pipeline as pipeline_lib
from moe_jax.data import sources as sources_lib


class _ListSource(sources_lib.Source):
  """Given documents, with optional domain labels."""

  def __init__(self, texts, domains=None, num_domains=0):
    self.texts, self.domains = list(texts), domains
    self.num_domains = num_domains

  def documents(self):
    for i, text in enumerate(self.texts):
      domain = -1 if self.domains is None else self.domains[i]
      yield sources_lib.Document(text, domain)

  def describe(self):
    return f"_ListSource({self.texts!r}, {self.domains!r})"


def _arange_stream(num_tokens):
  """A stream whose window i starts with token i * (S+1): windows are ids."""
  tokens = np.arange(num_tokens, dtype=np.int32)
  return pipeline_lib.TokenStream(tokens, np.zeros([1], np.int64),
                                  np.full([1], -1, np.int32), 0)


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


# ---------------------------------------------------------------------------
# (1) Packing against a hand-computed example.


def test_packing_hand_computed(char_tokenizer):
  # "abc" + "#", "de" + "#", "fghij" + "#" -> "abc#de#fghij#" (13 tokens).
  # S = 3: windows of 4 tokens: "abc#", "de#f", "ghij"; the last "#" drops.
  source = _ListSource(["abc", "de", "fghij"], domains=[2, 0, 1],
                       num_domains=3)
  stream = pipeline_lib.tokenize_documents(
      source.documents(), char_tokenizer, separator="#", num_domains=3)
  assert char_tokenizer.decode(stream.tokens) == "abc#de#fghij#"
  assert stream.tokens.dtype == np.uint16
  np.testing.assert_array_equal(stream.doc_starts, [0, 4, 7])
  np.testing.assert_array_equal(stream.doc_domains, [2, 0, 1])

  windows = pipeline_lib.PackedWindows(stream, seq_len=3)
  assert len(windows) == 3
  got = [char_tokenizer.decode(windows[i]["tokens"]) for i in range(3)]
  assert got == ["abc#", "de#f", "ghij"]
  # Window domain = domain of the document holding its first token:
  # 'a' in doc 0 (domain 2), 'd' in doc 1 (0), 'g' in doc 2 (1).
  assert [int(windows[i]["domain"]) for i in range(3)] == [2, 0, 1]
  packed = pipeline_lib.pack_windows(stream.tokens, 3)
  assert packed.shape == (3, 4)
  np.testing.assert_array_equal(packed[1], windows[1]["tokens"])

  # Unshuffled batch of all 3: inputs and targets are offset by one.
  ds = pipeline_lib.batched_dataset(windows, global_batch_size=3,
                                    shuffle=False, num_epochs=1,
                                    process_index=0, process_count=1)
  (batch,) = list(ds)
  assert batch["inputs"].shape == (3, 3) and batch["inputs"].dtype == np.int32
  assert [char_tokenizer.decode(r) for r in batch["inputs"]] == [
      "abc", "de#", "ghi"]
  assert [char_tokenizer.decode(r) for r in batch["targets"]] == [
      "bc#", "e#f", "hij"]
  np.testing.assert_array_equal(batch["domain"], [2, 0, 1])


def test_max_tokens_truncates_stream(char_tokenizer):
  source = _ListSource(["abc", "de", "fghij"])
  for max_tokens, text, starts in [(6, "abc#de", [0, 4]),
                                   (7, "abc#de#", [0, 4]),
                                   (4, "abc#", [0])]:
    stream = pipeline_lib.tokenize_documents(
        source.documents(), char_tokenizer, separator="#",
        max_tokens=max_tokens, chunk_docs=2)
    assert char_tokenizer.decode(stream.tokens) == text
    np.testing.assert_array_equal(stream.doc_starts, starts)


def test_token_cache_is_reused(char_tokenizer, tmp_path):
  source = _ListSource(["hello world", "second doc"] * 20)
  first = pipeline_lib.load_or_tokenize(source, char_tokenizer,
                                        cache_dir=tmp_path, separator="|")
  cached = list(tmp_path.glob("tokens-*"))
  assert len(cached) == 1
  again = pipeline_lib.load_or_tokenize(source, char_tokenizer,
                                        cache_dir=tmp_path, separator="|")
  assert isinstance(again.tokens, np.memmap)
  np.testing.assert_array_equal(first.tokens, again.tokens)
  np.testing.assert_array_equal(first.doc_starts, again.doc_starts)
  # A different separator is a different stream: a second cache entry.
  pipeline_lib.load_or_tokenize(source, char_tokenizer, cache_dir=tmp_path,
                                separator="#")
  assert len(list(tmp_path.glob("tokens-*"))) == 2


def _damage_truncate(cache):
  with open(cache / "tokens.bin", "r+b") as f:
    f.truncate(10)   # an interrupted copy


def _damage_meta(cache):
  (cache / "meta.json").write_text('{"dtype": "uint')


def _damage_starts(cache):
  (cache / "doc_starts.npy").unlink()


@pytest.mark.parametrize("damage", [_damage_truncate, _damage_meta,
                                    _damage_starts])
def test_inconsistent_cache_is_rebuilt_with_a_warning(char_tokenizer,
                                                      tmp_path, caplog,
                                                      damage):
  source = _ListSource(["hello world", "second doc"] * 20)
  first = pipeline_lib.load_or_tokenize(source, char_tokenizer,
                                        cache_dir=tmp_path)
  # A copy: first.tokens maps the file that is about to be damaged.
  first = pipeline_lib.TokenStream(np.array(first.tokens), first.doc_starts,
                                   first.doc_domains)
  [cache] = tmp_path.glob("tokens-*")
  damage(cache)
  with caplog.at_level(logging.INFO):
    again = pipeline_lib.load_or_tokenize(source, char_tokenizer,
                                          cache_dir=tmp_path)
  np.testing.assert_array_equal(first.tokens, again.tokens)
  np.testing.assert_array_equal(first.doc_starts, again.doc_starts)
  warnings = [r.getMessage() for r in caplog.records
              if r.levelno == logging.WARNING]
  assert len(warnings) == 1
  assert f"token cache {cache} is inconsistent" in warnings[0]
  assert "rebuilding" in warnings[0]
  if damage is _damage_truncate:
    assert "tokens.bin holds 10 bytes" in warnings[0]
  # Rebuilt in place, atomically: no temporary or discarded directory left.
  assert sorted(p.name for p in tmp_path.iterdir()) == [cache.name]


def test_cache_building_and_reuse_are_logged(char_tokenizer, tmp_path,
                                             caplog):
  source = _ListSource(["hello world", "second doc"] * 20)
  with caplog.at_level(logging.INFO):
    stream = pipeline_lib.load_or_tokenize(source, char_tokenizer,
                                           cache_dir=tmp_path)
  [cache] = tmp_path.glob("tokens-*")
  assert f"building the token cache {cache} from _ListSource" in caplog.text
  assert re.search(f"token cache: {len(stream.tokens)} tokens in [\\d.]+ s "
                   f"-> {re.escape(str(cache))}", caplog.text)
  caplog.clear()
  with caplog.at_level(logging.INFO):
    pipeline_lib.load_or_tokenize(source, char_tokenizer, cache_dir=tmp_path)
  assert (f"loaded token cache {cache} ({len(stream.tokens)} tokens)"
          in caplog.text)
  assert "building the token cache" not in caplog.text


def test_failed_cache_build_leaves_nothing(char_tokenizer, tmp_path):
  class _Failing(_ListSource):
    def documents(self):
      yield from super().documents()
      raise ValueError("bad record")
  source = _Failing(["doc"] * 600)   # fails after a first chunk is written
  with pytest.raises(ValueError, match="bad record"):
    pipeline_lib.load_or_tokenize(source, char_tokenizer, cache_dir=tmp_path)
  assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------
# Shuffle and (2) per-process slices.


def test_shuffle_is_a_permutation_per_epoch():
  seq_len, num_windows = 3, 24
  windows = pipeline_lib.PackedWindows(_arange_stream(num_windows * 4), seq_len)
  ds = pipeline_lib.batched_dataset(windows, global_batch_size=6, seed=7,
                                    process_index=0, process_count=1)
  ids = np.concatenate([ds[i]["inputs"][:, 0] // 4 for i in range(8)])
  epoch0, epoch1 = ids[:num_windows], ids[num_windows:]
  assert sorted(epoch0) == list(range(num_windows))
  assert sorted(epoch1) == list(range(num_windows))
  assert list(epoch0) != list(range(num_windows))   # shuffled
  assert list(epoch0) != list(epoch1)               # reshuffled each epoch
  # Same seed, same order; another seed, another order.
  again = pipeline_lib.batched_dataset(windows, global_batch_size=6, seed=7,
                                       process_index=0, process_count=1)
  np.testing.assert_array_equal(again[3]["inputs"], ds[3]["inputs"])
  other = pipeline_lib.batched_dataset(windows, global_batch_size=6, seed=8,
                                       process_index=0, process_count=1)
  assert not np.array_equal(other[0]["inputs"], ds[0]["inputs"])


def test_process_slices_partition_the_global_batch():
  source = sources_lib.SyntheticSource(60, seed=3)
  stream = pipeline_lib.tokenize_documents(
      source.documents(), _CharLike(), num_domains=source.num_domains)
  windows = pipeline_lib.PackedWindows(stream, seq_len=15)
  kwargs = dict(global_batch_size=8, seed=11)
  whole = pipeline_lib.batched_dataset(windows, process_index=0,
                                       process_count=1, **kwargs)
  parts = [pipeline_lib.batched_dataset(windows, process_index=p,
                                        process_count=2, **kwargs)
           for p in range(2)]
  for step in (0, 1, 5, len(windows) // 8 + 2):   # the last crosses an epoch
    g = whole[step]
    p0, p1 = parts[0][step], parts[1][step]
    assert set(g) == {"inputs", "targets", "domain"}
    for key in g:
      assert p0[key].shape[0] == p1[key].shape[0] == 4
      # Process p holds rows [4p, 4p + 4) of the global batch, in order.
      np.testing.assert_array_equal(np.concatenate([p0[key], p1[key]]), g[key])


class _CharLike:
  """Byte-level tokenizer with encode_batch, as SentencePieceTokenizer has."""

  vocab_size = 256

  def encode(self, text):
    return list(text.encode("utf-8"))

  def encode_batch(self, texts):
    return [self.encode(t) for t in texts]


def test_batch_must_divide_among_processes():
  windows = pipeline_lib.PackedWindows(_arange_stream(100), 3)
  with pytest.raises(ValueError, match=r"^global_batch_size=6: .* process "
                     r"count 4"):
    pipeline_lib.batched_dataset(windows, global_batch_size=6, seed=0,
                                 process_index=0, process_count=4)


# ---------------------------------------------------------------------------
# (3) Resume.


_MAX_TOKENS = 60 * 32 + 5


def _synthetic_pipeline(tmp_path, **kwargs):
  source = sources_lib.SyntheticSource(120, seed=5)
  # 60 windows of 32 tokens: 52 train windows (13 batches per epoch), 8 valid.
  kwargs = dict(seq_len=31, global_batch_size=4, seed=123, valid_windows=8,
                max_tokens=_MAX_TOKENS, cache_dir=tmp_path / "cache",
                process_index=0, process_count=1) | kwargs
  return pipeline_lib.build_pipeline(source, _CharLike(), **kwargs)


@pytest.mark.parametrize("process_count", [1, 2])
def test_resume_yields_the_uninterrupted_batches(tmp_path, process_count):
  n, m = 7, 30
  results = []
  for p in range(process_count):
    pipe = _synthetic_pipeline(tmp_path, process_index=p,
                               process_count=process_count)
    # More batches than one epoch: resume must also cross epoch boundaries.
    assert n + m > pipe.num_train_windows // 4
    straight = _take(pipe.train_iterator(), n + m)

    interrupted = pipe.train_iterator()
    _take(interrupted, n)
    state = json.loads(json.dumps(interrupted.get_state()))   # as saved
    del interrupted
    # A fresh pipeline (re-read from the token cache), as after a restart.
    fresh = _synthetic_pipeline(tmp_path, process_index=p,
                                process_count=process_count)
    resumed = _take(fresh.train_iterator(state), m)
    _assert_batches_equal(resumed, straight[n:])
    results.append(straight)
  if process_count == 2:
    # The two processes get different rows of each global batch.
    for a, b in zip(*results):
      assert not np.array_equal(a["inputs"], b["inputs"])


def test_resume_through_grain_checkpoint_handler(tmp_path):
  grain = pytest.importorskip("grain")
  pipe = _synthetic_pipeline(tmp_path)
  straight = _take(pipe.train_iterator(), 9)
  it = pipe.train_iterator()
  _take(it, 4)
  handler = grain.checkpoint.CheckpointHandler()
  (tmp_path / "ckpt").mkdir()   # orbax creates it in a real checkpoint
  handler.save(tmp_path / "ckpt", item=it)
  restored = pipe.train_iterator()
  handler.restore(tmp_path / "ckpt", item=restored)
  _assert_batches_equal(_take(restored, 5), straight[4:])


# ---------------------------------------------------------------------------
# Validation split.


def test_validation_is_the_unshuffled_tail(tmp_path):
  pipe = _synthetic_pipeline(tmp_path)
  assert pipe.num_valid_windows == 8 and pipe.num_valid_batches == 2
  stream = pipeline_lib.load_or_tokenize(
      sources_lib.SyntheticSource(120, seed=5), _CharLike(),
      cache_dir=tmp_path / "cache", max_tokens=_MAX_TOKENS)
  total = len(stream.tokens) // 32
  assert pipe.num_train_windows == total - 8
  first = list(pipe.valid_iterator())
  second = list(pipe.valid_iterator())
  _assert_batches_equal(first, second)     # same order every pass
  expected = pipeline_lib.pack_windows(stream.tokens, 31)[total - 8:]
  got = np.concatenate([np.concatenate([b["inputs"], b["targets"][:, -1:]], 1)
                        for b in first])
  np.testing.assert_array_equal(got, expected)
  # No validation window is ever a training window (one epoch of batches).
  valid_rows = {row.tobytes() for row in got}
  for i in range(pipe.num_train_windows // 4):
    b = pipe.train[i]
    rows = np.concatenate([b["inputs"], b["targets"][:, -1:]], 1)
    assert valid_rows.isdisjoint(row.tobytes() for row in rows)


def test_separate_validation_source(tmp_path):
  pipe = _synthetic_pipeline(
      tmp_path, valid_source=sources_lib.SyntheticSource(30, seed=99),
      valid_windows=0)
  stream = pipeline_lib.tokenize_documents(
      sources_lib.SyntheticSource(30, seed=99).documents(), _CharLike(),
      num_domains=4)
  assert pipe.num_valid_windows == len(stream.tokens) // 32
  batches = list(pipe.valid_iterator())
  assert len(batches) == pipe.num_valid_windows // 4
  np.testing.assert_array_equal(batches[0]["inputs"][0], stream.tokens[:31])


def test_too_little_data_names_the_arguments(char_tokenizer):
  source = _ListSource(["tiny"])
  with pytest.raises(ValueError, match=r"^global_batch_size=8: .*lower "
                     r"`seq_len` / `global_batch_size`"):
    pipeline_lib.build_pipeline(source, char_tokenizer, seq_len=2,
                                global_batch_size=8, process_index=0,
                                process_count=1)
