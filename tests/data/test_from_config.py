"""build_data(config, workdir): errors name the config field to change."""

import gzip
import json
import pathlib
import re

import numpy as np
import pytest

from moe_jax import config_lib
from moe_jax.data import from_config
from moe_jax.data import sources as sources_lib
from moe_jax.data import tiny_vlm
from moe_jax.data import tokenizer as tokenizer_lib
from tests.data import test_conversation as conv_cases

CONFIGS = pathlib.Path(__file__).resolve().parents[2] / "configs"
VOCAB = 200


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
  """A small BPE model trained once for the module (vocab 200)."""
  path = tmp_path_factory.mktemp("tok") / "tok.model"
  return tokenizer_lib.train_sentencepiece(
      sources_lib.SyntheticSource(300, seed=0), path, vocab_size=VOCAB)


@pytest.fixture
def config(model_path):
  """The tiny smoe config on a small synthetic corpus and a given model."""
  config = config_lib.load_config(f"{CONFIGS / 'smoe_154m.py'}:tiny")
  config.train.seq_len = 16   # data.seq_len refers to it
  config.train.global_batch = 4
  config.train.eval_batches = 1
  config.data.synthetic.num_docs = 100
  config.data.tokenizer = model_path
  config.data.vocab_size = VOCAB
  config.model.vocab_size = VOCAB
  return config


def _files_config(config, train_path, eval_path=""):
  config.data.source = "files"
  config.data.train_path = str(train_path)
  config.data.eval_path = str(eval_path)
  return config


def _jsonl(path, texts):
  path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
  return path


def test_builds_a_pipeline(config, tmp_path):
  pipe = from_config.build_data(config, str(tmp_path))
  batch = next(pipe.train_iterator())
  assert batch["inputs"].shape == (4, 16)
  assert pipe.vocab_size == VOCAB


def test_missing_paths_name_their_fields(config, tmp_path):
  missing = tmp_path / "nowhere" / "train"
  with pytest.raises(FileNotFoundError) as info:
    from_config.build_data(_files_config(config, missing), str(tmp_path))
  message = str(info.value)
  assert message.startswith(f"config.data.train_path: path='{missing}': ")
  assert "Point config.data.train_path at a file" in message
  assert "config.data.source='synthetic'" in message
  # The validation files name their own field.
  train = _jsonl(tmp_path / "train.jsonl", ["some text"])
  with pytest.raises(FileNotFoundError,
                     match=r"^config\.data\.eval_path: path='.*nowhere"):
    from_config.build_data(_files_config(config, train, missing),
                           str(tmp_path))


def test_pipeline_errors_name_their_fields(config, tmp_path):
  config.train.seq_len = 0
  with pytest.raises(ValueError,
                     match=r"^config\.data\.seq_len: seq_len=0: expected >= 1"):
    from_config.build_data(config, str(tmp_path))
  config.train.seq_len = 16
  config.data.max_tokens = 100
  with pytest.raises(ValueError) as info:
    from_config.build_data(config, str(tmp_path))
  message = str(info.value)
  assert message.startswith(
      "config.train.global_batch: global_batch_size=4: ")
  assert ("raise config.data.max_tokens, or lower config.data.seq_len / "
          "config.train.global_batch") in message


def test_source_settings_name_their_fields(config, tmp_path):
  config.data.synthetic.num_domains = 9
  with pytest.raises(ValueError, match=r"^config\.data\.synthetic\.num_domains"
                     r": num_domains=9: expected 1\.\.6"):
    from_config.build_data(config, str(tmp_path))
  bad = _jsonl(tmp_path / "d.jsonl", [])
  bad.write_text(json.dumps({"content": "x"}) + "\n")
  with pytest.raises(ValueError) as info:
    from_config.build_data(_files_config(config, bad), str(tmp_path))
  message = str(info.value)
  assert message.startswith(f"config.data.train_path: {bad}:1: no field")
  assert "Set config.data.text_field to the key" in message


def test_typo_in_tokenizer_path_is_an_error(config, tmp_path, monkeypatch):
  """A missing model file must not train a tokenizer and write it there."""
  def no_training(*args, **kwargs):
    raise AssertionError("trained a tokenizer for a path that is a typo")
  monkeypatch.setattr(tokenizer_lib, "train_sentencepiece", no_training)
  typo = tmp_path / "some" / "typo" / "c4.model"
  config.data.tokenizer = str(typo)
  with pytest.raises(FileNotFoundError) as info:
    from_config.build_data(config, str(tmp_path / "workdir"))
  message = str(info.value)
  assert message.startswith(f"config.data.tokenizer: model_path='{typo}': ")
  assert "config.data.tokenizer=''" in message   # how to train one instead
  assert not (tmp_path / "some").exists()
  assert not (tmp_path / "workdir").exists()


def test_empty_tokenizer_trains_into_the_workdir_once(config, tmp_path,
                                                      monkeypatch):
  config.data.tokenizer = ""
  from_config.build_data(config, str(tmp_path))
  cached = tmp_path / f"tokenizer_bpe{VOCAB}.model"
  assert cached.is_file()
  def no_training(*args, **kwargs):
    raise AssertionError("trained again instead of reusing the workdir's")
  monkeypatch.setattr(tokenizer_lib, "train_sentencepiece", no_training)
  pipe = from_config.build_data(config, str(tmp_path))   # a resumed run
  assert pipe.vocab_size == VOCAB
  # A vocabulary the corpus cannot support names config.data.vocab_size.
  monkeypatch.undo()
  config.data.vocab_size = config.model.vocab_size = 5000
  config.data.synthetic.num_docs = 5
  with pytest.raises(ValueError, match=r"^config\.data\.vocab_size: "
                     r"vocab_size=5000: .* lower config\.data\.vocab_size"):
    from_config.build_data(config, str(tmp_path / "small"))


@pytest.mark.parametrize("tokenizer", ["given", "trained"])
def test_latin1_training_file_names_file_and_fix(config, tmp_path, tokenizer):
  path = tmp_path / "latin1.txt"
  path.write_bytes("first line\nCafé crème\n".encode("latin-1"))
  if tokenizer == "trained":
    config.data.tokenizer = ""
  with pytest.raises(ValueError) as info:
    from_config.build_data(_files_config(config, path), str(tmp_path))
  message = str(info.value)
  assert message.startswith(f"config.data.train_path: {path}:2: not UTF-8")
  assert "iconv -f latin1 -t utf-8" in message
  assert not isinstance(info.value, UnicodeDecodeError)


def test_binary_validation_file_names_the_eval_field(config, tmp_path):
  train = _jsonl(tmp_path / "train.jsonl",
                 sources_lib.SyntheticSource(100, seed=1))
  valid = tmp_path / "valid.jsonl.gz"
  with gzip.open(valid, "wb") as f:
    f.write(b'{"text": "fine"}\n\x89PNG\r\n\x1a\n\xff\xfe\n')
  with pytest.raises(ValueError) as info:
    from_config.build_data(_files_config(config, train, valid), str(tmp_path))
  assert str(info.value).startswith(
      f"config.data.eval_path: {valid}:2: not UTF-8 text (byte 0x89")


def _shards(directory, split, n=8):
  """n one-document JSON-lines shards, `<split>0` ... in sorted name order."""
  directory.mkdir()
  for i in range(n):
    _jsonl(directory / f"shard_{i:02d}.jsonl", [f"{split}{i} text"])
  return directory


@pytest.mark.parametrize("shard_seed", [123, 7, None])
def test_shards_are_read_in_libmoes_permuted_order(config, tmp_path,
                                                   monkeypatch, model_path,
                                                   shard_seed):
  # algorithms.md §6.3: the shard list is permuted with default_rng(123);
  # LibMoE (slim_pajama.py) takes `[shards[i] for i in perm]` for every
  # split, each from a fresh generator, and trains its tokenizer on the
  # first train shards of that order.
  config = _files_config(config, _shards(tmp_path / "train", "train"),
                         _shards(tmp_path / "valid", "valid"))
  config.data.shard_seed = shard_seed
  config.data.tokenizer = ""
  seen = {}

  def tokenizer_reads(workdir, texts, **kwargs):
    seen["tokenizer"] = list(texts)
    return tokenizer_lib.load_tokenizer(model_path)

  def pipeline_gets(source, tokenizer, **kwargs):
    seen["train"] = list(source)
    seen["valid"] = list(kwargs["valid_source"])
    return "pipeline"

  monkeypatch.setattr(tokenizer_lib, "train_or_reuse_tokenizer",
                      tokenizer_reads)
  monkeypatch.setattr(from_config.pipeline_lib, "build_pipeline",
                      pipeline_gets)
  assert from_config.build_data(config, str(tmp_path)) == "pipeline"
  order = (list(range(8)) if shard_seed is None else
           list(np.random.default_rng(shard_seed).permutation(8)))
  for split in ("train", "valid"):
    assert seen[split] == [f"{split}{i} text" for i in order], split
  assert seen["tokenizer"] == seen["train"]
  if shard_seed == 123:
    # Spelled out (numpy's PCG64 stream), so a sorted order cannot pass.
    assert order == [0, 6, 4, 2, 7, 3, 1, 5]


def test_bad_shard_seed_names_the_field(config, tmp_path):
  config = _files_config(config, _shards(tmp_path / "train", "train"))
  config.data.shard_seed = -1
  with pytest.raises(ValueError, match=r"^config\.data\.shard_seed: "
                     r"shard_seed=-1: expected an integer >= 0"):
    from_config.build_data(config, str(tmp_path))


def test_config_error_keeps_the_kind():
  fields = {"seq_len": "config.data.seq_len", "": "config.data.train_path"}
  error = from_config.config_error(FileNotFoundError("seq_len: x"), fields)
  assert type(error) is FileNotFoundError
  assert str(error) == "config.data.seq_len: seq_len: x"
  # ValueError subclasses that need other arguments become ValueError.
  decode = UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")
  error = from_config.config_error(decode, fields)
  assert type(error) is ValueError
  assert re.match(r"config\.data\.train_path: 'utf-8' codec", str(error))
  # Unknown backticked names are left as they are.
  error = from_config.config_error(ValueError("a `b` `seq_len`"), fields)
  assert str(error) == "config.data.train_path: a `b` config.data.seq_len"


# --------------------------------------------------------------------------
# config.data.source='llava': build_llava_data.


@pytest.fixture
def vlm_config(tmp_path):
  """The tiny VLM SFT config, resolved by hand: the shapes set, a word
  tokenizer (30 tokens) and a 16 x 16 SigLIP preprocessor config."""
  shapes = tiny_vlm.write_shapes_dataset(tmp_path / "shapes", num_train=8,
                                         num_eval=4, image_size=16)
  processor = tmp_path / "siglip" / "preprocessor_config.json"
  processor.parent.mkdir()
  processor.write_text(json.dumps({
      "image_processor_type": "SiglipImageProcessor",
      "size": {"height": 16, "width": 16}}))
  config = config_lib.load_config(f"{CONFIGS / 'vlm' / 'smoe_sft.py'}:tiny")
  config.data.train_path = shapes.sft_json
  config.data.eval_path = shapes.sft_valid_json
  config.data.image_dir = shapes.image_dir
  config.data.tokenizer = conv_cases.write_word_tokenizer(tmp_path / "tok")
  config.data.image_processor = str(processor)
  config.model.vocab_size = 32
  config.vision.kind = "siglip"
  config.vision.image_size, config.vision.patch_size = 16, 8
  config.vlm.image_token_id = conv_cases.IMAGE_ID
  config.train.global_batch = 4
  config.train.eval_batches = 1
  return config


def test_llava_builds_a_pipeline(vlm_config, tmp_path):
  pipe = from_config.build_data(vlm_config, str(tmp_path))
  batch = next(pipe.train_iterator())
  assert batch["images"].shape == (4, 16, 16, 3)
  # (16 / 8)^2 = 4 image positions per sample.
  assert (batch["inputs"] == vlm_config.vlm.image_token_id).sum() == 4 * 4
  assert pipe.num_valid_batches == 1


@pytest.mark.parametrize("value, kind, message", [
    ("", ValueError, "path_or_dict='': empty"),
    ("/nonexistent-xyz", FileNotFoundError, "path_or_dict='/nonexistent-xyz'"),
])
def test_llava_image_processor_errors_name_the_field(vlm_config, tmp_path,
                                                     value, kind, message):
  vlm_config.data.image_processor = value
  with pytest.raises(kind, match=r"^config\.data\.image_processor: "
                     + re.escape(message)):
    from_config.build_data(vlm_config, str(tmp_path))


def test_llava_image_settings_name_their_fields(vlm_config, tmp_path):
  vlm_config.data.image_aspect = "crop"
  with pytest.raises(ValueError,
                     match=r"^config\.data\.image_aspect: aspect='crop'"):
    from_config.build_data(vlm_config, str(tmp_path))
  vlm_config.data.image_aspect = "pad"
  path = pathlib.Path(vlm_config.data.image_processor)
  path.write_text(json.dumps({"do_resize": False}))
  with pytest.raises(ValueError, match=r"^config\.data\.image_processor: "
                     f"{re.escape(str(path))}: do_resize=False"):
    from_config.build_data(vlm_config, str(tmp_path))


def test_llava_vocab_must_fit_the_embedding(vlm_config, tmp_path):
  vlm_config.model.vocab_size = 29     # the tokenizer has 30 tokens
  with pytest.raises(ValueError) as info:
    from_config.build_data(vlm_config, str(tmp_path))
  message = str(info.value)
  assert message.startswith("config.data.tokenizer: the tokenizer ")
  assert ("has 30 tokens (len(tokenizer), added tokens included) but "
          "config.model.vocab_size=29") in message


def test_llava_data_errors_name_their_fields(vlm_config, tmp_path):
  vlm_config.train.global_batch = 16   # more than the 8 training samples
  with pytest.raises(ValueError, match=r"^config\.train\.global_batch: "
                     r"global_batch_size=16: more than the 8 training"):
    from_config.build_data(vlm_config, str(tmp_path))
  vlm_config.train.global_batch = 8    # more than the 4 validation samples
  with pytest.raises(ValueError, match=r"^config\.data\.eval_path: "
                     r"valid_json=.*: 4 usable samples \(valid_samples=8\)"):
    from_config.build_data(vlm_config, str(tmp_path))
  vlm_config.train.global_batch = 4
  vlm_config.data.image_dir = str(tmp_path / "elsewhere")
  with pytest.raises(FileNotFoundError, match=(
      r"^config\.data\.image_dir: .*sft\.json: sample 'train-00000' "
      r"\(entry 0\): image '.*elsewhere/images/train-00000\.png'")):
    from_config.build_data(vlm_config, str(tmp_path))
  missing = tmp_path / "missing.json"
  vlm_config.data.train_path = str(missing)
  with pytest.raises(FileNotFoundError, match=r"^config\.data\.train_path: "
                     f"{re.escape(str(missing))}: no such LLaVA JSON file"):
    from_config.build_data(vlm_config, str(tmp_path))
