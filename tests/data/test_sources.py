"""Document sources: the real sample files, the synthetic corpus, errors."""

import collections
import gzip
import json
import os
import re

import numpy as np
import pytest

from moe_jax.data import pipeline as pipeline_lib
from moe_jax.data import sources as sources_lib
from moe_jax.data import tokenizer as tokenizer_lib


def _need(path):
  if not os.path.exists(path):
    pytest.skip(f"sample {path} not found")
  return str(path)


def _count_jsonl(path):
  with open(path, encoding="utf-8") as f:
    return sum(1 for line in f if line.strip() and json.loads(line)["text"])


# ---------------------------------------------------------------------------
# (5) Real samples in ../shared/data.


def test_text_sources_on_real_files(shared_data):
  path = _need(shared_data / "tinyshakespeare.txt")
  (doc,) = list(sources_lib.TextSource(path))
  with open(path, encoding="utf-8") as f:
    assert doc == f.read()
  assert doc.startswith("First Citizen:")

  wiki = _need(shared_data / "pretrain" / "wikitext-2")
  lines = sources_lib.TextSource(wiki, doc_mode="line")
  assert [os.path.basename(p) for p in lines.paths] == ["test.txt",
                                                         "valid.txt"]
  expected = 0
  for p in lines.paths:
    with open(p, encoding="utf-8") as f:
      expected += sum(1 for line in f if line.strip())
  docs = list(lines)
  assert len(docs) == expected and docs[0] == " = Robert <unk> = "
  paragraphs = list(sources_lib.TextSource(path, doc_mode="paragraph"))
  assert paragraphs[0] == ("First Citizen:\nBefore we proceed any further, "
                           "hear me speak.")


def test_jsonl_sources_on_real_files(shared_data):
  c4 = _need(shared_data / "pretrain" / "c4_redpajama_sample" /
             "tiny_c4_sample.jsonl")
  docs = list(sources_lib.JsonlSource(c4))
  assert len(docs) == _count_jsonl(c4) == 449
  # A directory of shards, as SlimPajama arrives: every file, sorted.
  dolma = _need(shared_data / "pretrain" / "dolma_cc_sample")
  source = sources_lib.JsonlSource(dolma)
  assert [os.path.basename(p) for p in source.paths] == [
      "cc_en_head-0091.jsonl", "cc_en_head-0174.jsonl"]
  assert len(list(source)) == sum(_count_jsonl(p) for p in source.paths) == 20
  # A glob, with a permuted shard order: the same documents.
  shuffled = sources_lib.JsonlSource(os.path.join(dolma, "*.jsonl"),
                                     shard_seed=1)
  assert sorted(shuffled) == sorted(source)
  arxiv = _need(shared_data / "pretrain" / "redpajama_arxiv_sample" /
                "arxiv.jsonl")
  assert len(list(sources_lib.JsonlSource(arxiv))) == 20
  # Another field name.
  lambada = shared_data / "lm_eval" / "lambada" / "lambada_test.jsonl"
  if lambada.is_file():
    first = next(iter(sources_lib.JsonlSource(str(lambada), text_field="text")))
    assert isinstance(first, str) and first


def test_parquet_source_on_real_files(shared_data):
  directory = _need(shared_data / "pretrain" / "c4_hf_parquet")
  source = sources_lib.make_source("parquet", path=directory)
  docs = list(source)
  assert len(docs) == 240   # 200 train + 40 validation rows
  assert docs[0].startswith("Beginners BBQ Class Taking Place in Missoula!")
  train = sources_lib.ParquetSource(os.path.join(directory, "*train*"),
                                    batch_rows=7)
  assert list(train) == docs[:200]


def test_files_source_picks_readers_by_extension(shared_data):
  pretrain = shared_data / "pretrain"
  paths = [_need(pretrain / "c4_hf_parquet"),
           _need(pretrain / "dolma_cc_sample" / "cc_en_head-0091.jsonl"),
           _need(pretrain / "wikitext-2-raw" / "wiki.test.raw")]
  source = sources_lib.make_source("files", path=paths, doc_mode="line")
  docs = list(source)
  parquet = list(sources_lib.ParquetSource(paths[0]))
  jsonl = list(sources_lib.JsonlSource(paths[1]))
  text = list(sources_lib.TextSource(paths[2], doc_mode="line"))
  assert docs == parquet + jsonl + text
  # Shards of mixed kinds in one directory (a directory of .jsonl files).
  assert len(list(sources_lib.make_source(
      "files", path=str(pretrain / "dolma_cc_sample")))) == 20


def test_array_record_and_tfds_sources_on_real_files(shared_data, tmp_path):
  version_dir = shared_data / "pretrain" / "c4_tfds_minimal" / "3.0.1"
  _need(version_dir)
  # A directory with both TFRecord and ArrayRecord shards: only the latter.
  source = sources_lib.make_source("array_record", path=str(version_dir))
  assert len(source.paths) == 10
  docs = list(source)
  assert len(docs) == 1200   # tf.train.Example records, feature 'text'
  train = sources_lib.ArrayRecordSource(
      str(version_dir / "c4-train.array_record-*"), record_format="example")
  train_docs = list(train)
  assert len(train_docs) == 1000
  assert train_docs[0].startswith("Posted on April 12, 2018")

  # The sample's metadata says TFRecord, which tfds.data_source cannot read;
  # lay out the same ArrayRecord shards as a prepared 'c4/en:3.0.1'.
  target = tmp_path / "tfds" / "c4" / "en" / "3.0.1"
  target.mkdir(parents=True)
  for name in os.listdir(version_dir):
    if ".array_record-" in name or name == "features.json":
      os.symlink(version_dir / name, target / name)
  with open(version_dir / "dataset_info.json") as f:
    info = json.load(f)
  info.update(name="c4", fileFormat="array_record")
  with open(target / "dataset_info.json", "w") as f:
    json.dump(info, f)
  tfds_source = sources_lib.make_source(
      "tfds", tfds_name="c4/en:3.0.1", tfds_split="train",
      tfds_data_dir=str(tmp_path / "tfds"))
  assert list(tfds_source) == train_docs
  by_dir = sources_lib.TfdsSource(str(target), split="validation")
  assert len(list(by_dir)) == 200


def test_tinyshakespeare_through_the_pipeline(shared_data, tmp_path):
  path = _need(shared_data / "tinyshakespeare.txt")
  source = sources_lib.TextSource(path, doc_mode="paragraph")
  tok = tokenizer_lib.train_or_reuse_tokenizer(
      tmp_path, source, vocab_size=300, max_chars=200_000)
  pipe = pipeline_lib.build_pipeline(
      source, tok, seq_len=64, global_batch_size=8, valid_windows=16,
      max_tokens=50_000, cache_dir=tmp_path / "cache", process_index=0,
      process_count=1)
  batch = next(pipe.train_iterator())
  assert batch["inputs"].shape == (8, 64) and "domain" not in batch
  assert batch["inputs"].max() < 300
  np.testing.assert_array_equal(batch["inputs"][:, 1:],
                                batch["targets"][:, :-1])
  text = tok.decode(next(pipe.valid_iterator())["inputs"][0])
  assert re.search(r"[A-Za-z]{3}", text)


def test_in_test_array_record_and_compressed_jsonl(tmp_path):
  array_record_module = pytest.importorskip(
      "array_record.python.array_record_module")
  writer = array_record_module.ArrayRecordWriter(
      str(tmp_path / "d.array_record"), "group_size:1")
  for text in ["first doc", "zweites Dokument \u00fc"]:
    writer.write(text.encode("utf-8"))
  writer.close()
  assert list(sources_lib.ArrayRecordSource(str(tmp_path))) == [
      "first doc", "zweites Dokument \u00fc"]
  with gzip.open(tmp_path / "x.jsonl.gz", "wt") as f:
    f.write(json.dumps({"body": "gz doc"}) + "\n\n")
  assert list(sources_lib.JsonlSource(str(tmp_path / "x.jsonl.gz"),
                                      text_field="body")) == ["gz doc"]


# ---------------------------------------------------------------------------
# (6) Synthetic corpus.

_DOMAIN_PATTERNS = {
    "arithmetic": r"(-?\d+ [-+*] -?\d+ = -?\d+ \.)"
                  r"( -?\d+ [-+*] -?\d+ = -?\d+ \.)*",
    "animals": r"((^| )[a-z]+ [a-z]+ [a-z]+ [a-z]+ [a-z]+ [a-z]+ [a-z]+ \.)+",
    "reversed": r"([a-z]+( [a-z]+)* \.)( [a-z]+( [a-z]+)* \.)*",
    "records": r"(id=\d{4}( ; [a-z]+=[a-z0-9]+)* ;\n?)+",
    "code": r"(def f\d+\(x\): return x [-+*] \d+ if x > \d+ else x\n?)+",
    "dna": r"([ACGT]+ \|)( [ACGT]+ \|)*",
}


def _domain_of(text):
  """The domain whose pattern and vocabulary the text matches, or None."""
  # pylint: disable=protected-access
  animals = set(sources_lib._ANIMALS)
  reversed_words = {w[::-1] for w in sources_lib._REV_WORDS}
  # pylint: enable=protected-access
  matches = []
  for name, pattern in _DOMAIN_PATTERNS.items():
    if not re.fullmatch(pattern, text):
      continue
    words = set(re.findall(r"[a-z]+", text))
    if name == "animals" and not words & animals:
      continue
    if name == "reversed" and not words <= reversed_words:
      continue
    matches.append(name)
  return matches


def test_synthetic_corpus_is_deterministic_and_labeled():
  a = list(sources_lib.SyntheticSource(200, num_domains=4, seed=7).documents())
  b = list(sources_lib.SyntheticSource(200, num_domains=4, seed=7).documents())
  c = list(sources_lib.SyntheticSource(200, num_domains=4, seed=8).documents())
  assert a == b and a != c
  # Random access: document 123 alone equals the 124th of the sequence.
  assert sources_lib.SyntheticSource(200, seed=7)[123] == a[123]
  counts = collections.Counter(d.domain for d in a)
  assert sorted(counts) == [0, 1, 2, 3]
  assert min(counts.values()) > 30          # roughly uniform
  six = sources_lib.SyntheticSource(300, num_domains=6, seed=0)
  assert six.num_domains == 6 and len(six.domain_names) == 6
  assert {d.domain for d in six.documents()} == set(range(6))


def test_synthetic_domains_are_distinguishable():
  source = sources_lib.SyntheticSource(240, num_domains=6, seed=1)
  for doc in source.documents():
    # Exactly one domain's grammar matches each document: its own.
    assert _domain_of(doc.text) == [source.domain_names[doc.domain]], doc
    if source.domain_names[doc.domain] == "arithmetic":
      for a, op, b, c in re.findall(r"(-?\d+) ([-+*]) (-?\d+) = (-?\d+)",
                                    doc.text):
        assert eval(f"{a} {op} {b}") == int(c)  # pylint: disable=eval-used


def test_synthetic_domain_labels_reach_the_batches():
  source = sources_lib.SyntheticSource(50, num_domains=3, seed=2)
  docs = list(source.documents())
  stream = pipeline_lib.tokenize_documents(
      source.documents(), _Bytes(), separator="#", num_domains=3)
  windows = pipeline_lib.PackedWindows(stream, seq_len=40)
  ds = pipeline_lib.batched_dataset(windows, global_batch_size=5, seed=0,
                                    process_index=0, process_count=1)
  ends = np.cumsum([len(d.text.encode()) + 1 for d in docs])
  for batch in (ds[0], ds[3]):
    for row, domain in zip(batch["inputs"], batch["domain"]):
      start = _find_window(stream.tokens, row)
      doc = int(np.searchsorted(ends, start, side="right"))
      assert docs[doc].domain == domain


def _find_window(tokens, row):
  w = len(row) + 1
  for i in range(len(tokens) // w):
    if np.array_equal(tokens[i * w:i * w + len(row)], row):
      return i * w
  raise AssertionError("window not found")


class _Bytes:
  vocab_size = 256

  def encode(self, text):
    return list(text.encode("utf-8"))


def test_synthetic_rejects_bad_settings():
  with pytest.raises(ValueError, match="^num_domains=9: expected 1..6"):
    sources_lib.SyntheticSource(10, num_domains=9)
  with pytest.raises(ValueError, match="^num_docs=0"):
    sources_lib.SyntheticSource(0)


# ---------------------------------------------------------------------------
# (7) Missing data: the error names what was looked for and the argument
# (from_config puts the config field in front: test_from_config.py).


@pytest.mark.parametrize("kind",
                         ["files", "text", "jsonl", "parquet", "array_record"])
def test_missing_path_names_path_and_argument(kind, tmp_path):
  missing = str(tmp_path / "no_such_dir" / "shard.x")
  with pytest.raises(FileNotFoundError) as info:
    sources_lib.make_source(kind, path=missing)
  message = str(info.value)
  assert message.startswith(f"path={missing!r}: no ")
  assert "config." not in message   # sources know no config fields
  assert "synthetic" in message   # how to run without data
  # An empty directory or a glob that matches nothing fails the same way.
  with pytest.raises(FileNotFoundError, match=r"^path="):
    sources_lib.make_source(kind, path=str(tmp_path))
  with pytest.raises(FileNotFoundError, match=r"glob pattern"):
    sources_lib.make_source(kind, path=str(tmp_path / "*.nothing"))
  with pytest.raises(FileNotFoundError, match=f"^kind='{kind}' needs `path`"):
    sources_lib.make_source(kind)


def test_missing_tfds_dataset_names_name_dir_and_arguments(tmp_path):
  with pytest.raises(FileNotFoundError) as info:
    sources_lib.make_source("tfds", tfds_name="c4/en:3.0.1",
                            tfds_data_dir=str(tmp_path))
  message = str(info.value)
  assert message.startswith("tfds_name='c4/en:3.0.1': ")
  assert f"`tfds_data_dir`={str(tmp_path)!r}" in message
  with pytest.raises(FileNotFoundError, match="^tfds_data_dir='"):
    sources_lib.make_source("tfds", tfds_name="c4",
                            tfds_data_dir=str(tmp_path / "absent"))
  with pytest.raises(ValueError, match="^tfds_name is empty"):
    sources_lib.make_source("tfds")


def test_bad_records_name_file_and_argument(tmp_path):
  path = tmp_path / "d.jsonl"
  path.write_text(json.dumps({"content": "x"}) + "\n")
  with pytest.raises(ValueError, match=r"d\.jsonl:1: no field 'text'.*"
                     r"`text_field`"):
    list(sources_lib.JsonlSource(str(path)))
  with pytest.raises(ValueError, match=r"^kind='csv': expected one of"):
    sources_lib.make_source("csv", path=str(path))


# ---------------------------------------------------------------------------
# (8) Text that is not UTF-8: the error names the file, the line and the fix.


def _latin1_file(path, lines):
  """`lines` joined by newlines, encoded as Latin-1 (gzip for .gz names)."""
  data = "\n".join(lines).encode("latin-1")
  if str(path).endswith(".gz"):
    data = gzip.compress(data)
  path.write_bytes(data)
  return str(path)


def _assert_not_utf8(info, path, line):
  message = str(info.value)
  assert message.startswith(f"{path}:{line}: not UTF-8 text (byte 0xe9")
  assert "iconv -f latin1 -t utf-8" in message and "`path`" in message
  # A plain ValueError naming the file, not the bare decoder error.
  assert not isinstance(info.value, UnicodeDecodeError)
  assert isinstance(info.value.__cause__, UnicodeDecodeError)


@pytest.mark.parametrize("doc_mode", ["file", "line", "paragraph"])
@pytest.mark.parametrize("name", ["latin1.txt", "latin1.txt.gz"])
def test_latin1_text_names_file_line_and_fix(tmp_path, doc_mode, name):
  # 5000 good lines first: the decoder fails blocks, not lines, past them.
  path = _latin1_file(tmp_path / name,
                      ["plain ascii"] * 5000 + ["", "un café crème"])
  with pytest.raises(ValueError) as info:
    list(sources_lib.TextSource(path, doc_mode=doc_mode))
  _assert_not_utf8(info, path, 5002)
  if name.endswith(".gz"):
    assert "zcat latin1.txt.gz | iconv" in str(info.value)


@pytest.mark.parametrize("kind", ["jsonl", "files"])
def test_binary_jsonl_names_file_and_line(tmp_path, kind):
  path = tmp_path / "d.jsonl"
  good = [json.dumps({"text": f"doc {i}"}) for i in range(3000)]
  path.write_bytes("\n".join(good + ['{"text": "é"}']).encode("latin-1"))
  with pytest.raises(ValueError) as info:
    list(sources_lib.make_source(kind, path=str(path)))
  _assert_not_utf8(info, path, 3001)
