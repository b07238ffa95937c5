"""HFTokenizer and config.data.tokenizer_type='hf' against transformers.

The tokenizer is built in the test: a byte-level BPE trained with the
`tokenizers` library on text from temporary files, saved as an HF directory
by transformers. The oracle is `transformers.AutoTokenizer` loading the same
directory offline, a separate loader from HFTokenizer's own.
"""

import json
import pathlib
import shutil

import numpy as np
import pytest

from moe_jax import config_lib
from moe_jax.data import from_config
from moe_jax.data import sources as sources_lib
from moe_jax.data import tokenizer as tokenizer_lib

tokenizers = pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")

CONFIGS = pathlib.Path(__file__).resolve().parents[2] / "configs"
# Multilingual text, runs of spaces, newlines, digits, a special token's
# text and the added token: every path through the pre-tokenizer.
SAMPLES = [
    "The cat sat on the mat.",
    "  two  spaces,\ttab and\nnewline\n\n",
    "Café crème, 中文字符 and an emoji 🙂 cost 12345 €.",
    "<s>a sentence<STORY_SEP>another one</s>",
    "",
]
ADDED_TOKEN = "<extra_0>"


def _train(tmp_path: pathlib.Path) -> "tokenizers.Tokenizer":
  """A byte-level BPE (no unknown characters) trained on two text files."""
  files = []
  for i, texts in enumerate([
      [d.text for d in sources_lib.SyntheticSource(60, seed=0).documents()],
      SAMPLES[:3] * 5]):
    path = tmp_path / f"train{i}.txt"
    path.write_text("\n".join(texts), encoding="utf-8")
    files.append(str(path))
  pre = tokenizers.pre_tokenizers
  tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = pre.ByteLevel(add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  tok.train(files, tokenizers.trainers.BpeTrainer(
      vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"],
      initial_alphabet=pre.ByteLevel.alphabet(), show_progress=False))
  # A Llama-style post-processor that prepends bos: encode must not apply it.
  tok.post_processor = tokenizers.processors.TemplateProcessing(
      single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
  return tok


def _save(tok, directory: pathlib.Path) -> pathlib.Path:
  fast = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
      unk_token="<unk>")
  fast.add_tokens([ADDED_TOKEN])   # a non-special added token
  fast.save_pretrained(str(directory))
  return directory


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  """An HF tokenizer directory: tokenizer.json + tokenizer_config.json."""
  tmp = tmp_path_factory.mktemp("hf")
  directory = _save(_train(tmp), tmp / "model")
  assert {p.name for p in directory.iterdir()} >= {
      "tokenizer.json", "tokenizer_config.json"}
  return directory


def _oracle(directory):
  return transformers.AutoTokenizer.from_pretrained(str(directory),
                                                    local_files_only=True)


def _oracle_ids(oracle, text):
  return oracle.encode(text, add_special_tokens=False)


def test_ids_equal_transformers(hf_dir):
  tok = tokenizer_lib.load_hf_tokenizer(hf_dir)
  oracle = _oracle(hf_dir)
  for text in SAMPLES:
    assert tok.encode(text) == _oracle_ids(oracle, text), text
  assert tok.encode_batch(SAMPLES) == [_oracle_ids(oracle, t)
                                       for t in SAMPLES]
  # Merges happened: fewer ids than bytes (not a byte-per-token model).
  assert len(tok.encode(SAMPLES[0])) < len(SAMPLES[0].encode())
  assert tok.vocab_size == len(tok) == len(oracle)
  assert tok.vocab_size > oracle.vocab_size     # the added token counts
  assert tok.encode(ADDED_TOKEN) == [oracle.convert_tokens_to_ids(
      ADDED_TOKEN)]
  assert (tok.bos_id, tok.eos_id) == (oracle.bos_token_id,
                                      oracle.eos_token_id)
  assert tok.bos_id is not None and tok.eos_id is not None
  # Special tokens are ids, but never added by encode.
  assert tok.bos_id not in tok.encode(SAMPLES[0])


def test_token_to_id(hf_dir):
  tok = tokenizer_lib.HFTokenizer(hf_dir)
  oracle = _oracle(hf_dir)
  assert tok.token_to_id(ADDED_TOKEN) == oracle.convert_tokens_to_ids(
      ADDED_TOKEN)
  assert tok.token_to_id("</s>") == tok.eos_id
  assert tok.token_to_id("<no such token>") is None


def test_decode_round_trip(hf_dir):
  tok = tokenizer_lib.HFTokenizer(hf_dir)
  oracle = _oracle(hf_dir)
  for text in SAMPLES:
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.decode(np.asarray(ids, np.uint16)) == text
    assert tok.decode(ids) == oracle.decode(ids)
  assert "".join(tok.pieces("The cat")) == "The" + "\u0120" + "cat"
  assert tok.id_to_piece(tok.eos_id) == "</s>"


def _variant(hf_dir, tmp_path, edit_config=None, edit_backend=None):
  """A copy of `hf_dir` with its config and / or backend edited."""
  directory = pathlib.Path(shutil.copytree(hf_dir, tmp_path / "variant"))
  if edit_config:
    path = directory / "tokenizer_config.json"
    config = json.loads(path.read_text())
    edit_config(config)
    path.write_text(json.dumps(config))
  if edit_backend:
    path = str(directory / "tokenizer.json")
    backend = tokenizers.Tokenizer.from_file(path)
    edit_backend(backend)
    backend.save(path)
  return directory


def test_saved_truncation_and_padding_are_ignored(hf_dir, tmp_path):
  """tokenizer.json's own truncation / padding would cut or pad documents."""
  def edit(backend):
    backend.enable_truncation(max_length=4)
    backend.enable_padding(pad_id=0, pad_token="<unk>")
  directory = _variant(hf_dir, tmp_path, edit_backend=edit)
  tok = tokenizer_lib.HFTokenizer(directory)
  oracle = _oracle(directory)
  long_text = SAMPLES[2] * 3
  assert len(tok.encode(long_text)) > 4
  assert tok.encode(long_text) == _oracle_ids(oracle, long_text)
  batch = tok.encode_batch(["a", long_text])
  assert batch == [_oracle_ids(oracle, "a"), _oracle_ids(oracle, long_text)]


def test_special_tokens_from_the_config(hf_dir, tmp_path):
  """Special tokens saved as AddedToken dicts, or absent from the vocabulary
  (transformers adds those on load: ids and len follow it)."""
  def edit(config):
    config["bos_token"] = {"__type": "AddedToken", "content": "<s>",
                           "lstrip": False, "rstrip": False,
                           "normalized": False, "single_word": False,
                           "special": True}
    config["pad_token"] = "<pad>"
  directory = _variant(hf_dir, tmp_path, edit_config=edit)
  tok = tokenizer_lib.HFTokenizer(directory)
  oracle = _oracle(directory)
  assert tok.vocab_size == len(oracle) == len(_oracle(hf_dir)) + 1
  assert tok.bos_id == oracle.bos_token_id is not None
  text = "padded<pad><pad> text"
  assert tok.encode(text) == _oracle_ids(oracle, text)
  assert oracle.pad_token_id in tok.encode(text)


def test_fingerprint_follows_the_files(hf_dir, tmp_path):
  tok = tokenizer_lib.HFTokenizer(hf_dir)
  assert tok.fingerprint() == tokenizer_lib.HFTokenizer(hf_dir).fingerprint()
  other = _variant(hf_dir, tmp_path,
                   edit_config=lambda c: c.update(pad_token="<pad>"))
  assert tokenizer_lib.HFTokenizer(other).fingerprint() != tok.fingerprint()


def test_load_errors_name_the_directory(hf_dir, tmp_path):
  empty = tmp_path / "empty"
  empty.mkdir()
  for directory in (empty, tmp_path / "nowhere"):
    with pytest.raises(FileNotFoundError) as info:
      tokenizer_lib.HFTokenizer(directory)
    message = str(info.value)
    assert message.startswith(f"model_dir='{directory}': no tokenizer.json")
    assert repr(str(directory / "tokenizer.json")) in message
  with pytest.raises(ValueError, match=r"^model_dir='.*': a file, not a "
                     r"directory"):
    tokenizer_lib.HFTokenizer(hf_dir / "tokenizer.json")
  bad = tmp_path / "bad"
  bad.mkdir()
  (bad / "tokenizer.json").write_text("{not json")
  with pytest.raises(ValueError, match=r"tokenizer\.json is not a tokenizers "
                     r"file"):
    tokenizer_lib.HFTokenizer(bad)


# --------------------------------------------------------------------------
# build_data with config.data.tokenizer_type='hf'.


@pytest.fixture
def config(hf_dir):
  """The tiny smoe config on a small synthetic corpus and the HF tokenizer."""
  config = config_lib.load_config(f"{CONFIGS / 'smoe_154m.py'}:tiny")
  assert config.data.tokenizer_type == "sentencepiece"   # the default
  config.train.seq_len = 16   # data.seq_len refers to it
  config.train.global_batch = 4
  config.train.eval_batches = 1
  config.data.synthetic.num_docs = 100
  config.data.tokenizer_type = "hf"
  config.data.tokenizer = str(hf_dir)
  vocab = len(_oracle(hf_dir))
  config.data.vocab_size = config.model.vocab_size = vocab
  return config


def _window(batch, row):
  """Window `row` of a batch: inputs plus the last target, [S+1]."""
  return np.concatenate([batch["inputs"][row], batch["targets"][row][-1:]])


def test_build_data_windows_match_transformers(config, hf_dir, tmp_path):
  pipe = from_config.build_data(config, str(tmp_path))
  oracle = _oracle(hf_dir)
  source = sources_lib.make_source(
      "synthetic", synthetic=config.data.synthetic.to_dict())
  sep = config.data.doc_separator
  stream = np.array([t for d in source.documents()
                     for t in _oracle_ids(oracle, d.text + sep)])
  size = config.data.seq_len + 1
  windows = stream[:len(stream) // size * size].reshape(-1, size)
  assert pipe.vocab_size == len(oracle)
  assert pipe.num_train_windows + pipe.num_valid_windows == len(windows)
  # Validation: the last windows of the stream, in stream order.
  valid = next(pipe.valid_iterator())
  for row in range(4):
    np.testing.assert_array_equal(_window(valid, row),
                                  windows[pipe.num_train_windows + row])
  # Training: shuffled, but every row is one of the training windows.
  train = {tuple(w) for w in windows[:pipe.num_train_windows]}
  batch = next(pipe.train_iterator())
  for row in range(4):
    assert tuple(_window(batch, row)) in train


def test_build_data_vocab_must_fit_the_embedding(config, tmp_path):
  vocab = config.model.vocab_size
  # A larger embedding than the tokenizer is fine (HF checkpoints pad it).
  config.data.vocab_size = config.model.vocab_size = vocab + 1
  from_config.build_data(config, str(tmp_path / 'larger'))
  # A smaller one cannot hold every id.
  config.data.vocab_size = config.model.vocab_size = vocab - 1
  with pytest.raises(ValueError) as info:
    from_config.build_data(config, str(tmp_path / 'smaller'))
  message = str(info.value)
  assert message.startswith("config.data.tokenizer: the tokenizer ")
  assert (f"has {vocab} tokens (len(tokenizer), added tokens included) but "
          f"config.model.vocab_size={vocab - 1}") in message
  assert "embedding must have at least that many rows" in message


def test_build_data_missing_tokenizer_json(config, tmp_path):
  directory = tmp_path / "not_a_model"
  directory.mkdir()
  config.data.tokenizer = str(directory)
  with pytest.raises(FileNotFoundError) as info:
    from_config.build_data(config, str(tmp_path / "workdir"))
  message = str(info.value)
  assert message.startswith(
      f"config.data.tokenizer: model_dir='{directory}': no tokenizer.json")
  assert str(directory / "tokenizer.json") in message
  assert "Point config.data.tokenizer at a Hugging Face" in message
  # An empty path cannot mean 'train one' for an HF tokenizer.
  config.data.tokenizer = ""
  with pytest.raises(ValueError, match=r"^config\.data\.tokenizer: empty, "
                     r"but config\.data\.tokenizer_type='hf'"):
    from_config.build_data(config, str(tmp_path / "workdir"))
  assert not (tmp_path / "workdir").exists()


def test_build_data_bad_tokenizer_type(config, tmp_path):
  config.data.tokenizer_type = "wordpiece"
  with pytest.raises(ValueError, match=(
      r"^config\.data\.tokenizer_type='wordpiece': expected one of "
      r"'sentencepiece' \| 'hf'\.$")):
    from_config.build_data(config, str(tmp_path))
