"""Builds a run's data pipeline from its config: the only data module that
knows config field names.

`build_data(config, workdir)` = source(s) from `config.data` -> tokenizer
(`config.data.tokenizer_type` 'sentencepiece': loaded from
`config.data.tokenizer`, or trained and cached in the workdir when it is '';
'hf': the tokenizer files of the HF model directory `config.data.tokenizer`)
-> grain pipeline. Training, evaluation, tracing and analysis all call it, so
none of them imports the training loop to get data.

sources.py, tokenizer.py and pipeline.py name their own arguments in errors:
the argument at fault first ('seq_len=0: expected >= 1.'), others in
backticks in the hints ('lower `seq_len`'). Here each stage's ValueError /
FileNotFoundError is re-raised with the config field of that argument in
front and the backticked names replaced by config fields, as config_lib
prefixes router errors with 'moe.router_options.':

  config.data.seq_len: seq_len=0: expected >= 1.
"""

from __future__ import annotations

import contextlib
import os
import re
from typing import Callable, Iterator, Mapping

import ml_collections

from moe_jax.data import images as images_lib
from moe_jax.data import llava as llava_lib
from moe_jax.data import pipeline as pipeline_lib
from moe_jax.data import sources as sources_lib
from moe_jax.data import tokenizer as tokenizer_lib
from moe_jax.models import vision

# Source arguments -> fields of config.data; 'path' and 'tfds_split' depend
# on the source (training or validation), see _source_fields.
_SOURCE_FIELDS = {
    'kind': 'config.data.source',
    'text_field': 'config.data.text_field',
    'doc_mode': 'config.data.doc_mode',
    'tfds_name': 'config.data.tfds_name',
    'tfds_data_dir': 'config.data.tfds_data_dir',
    'num_docs': 'config.data.synthetic.num_docs',
    'num_domains': 'config.data.synthetic.num_domains',
    'seed': 'config.data.synthetic.seed',
    'shard_seed': 'config.data.shard_seed',
}
_TOKENIZER_FIELDS = {
    'model_path': 'config.data.tokenizer',
    'model_dir': 'config.data.tokenizer',
    'vocab_size': 'config.data.vocab_size',
    'split_digits': 'config.data.split_digits',
    'separator': 'config.data.doc_separator',
}
# Arguments of llava.build_llava_pipeline and of
# images.ImageSpec.from_preprocessor_config -> fields of the config.
_LLAVA_FIELDS = {
    'train_json': 'config.data.train_path',
    'valid_json': 'config.data.eval_path',
    # valid_samples = eval_batches * global_batch.
    'valid_samples': 'config.train.eval_batches',
    'seq_len': 'config.data.seq_len',
    'too_long': 'config.data.too_long',
    'template': 'config.data.template',
    'global_batch_size': 'config.train.global_batch',
    'image_dir': 'config.data.image_dir',
    'path_or_dict': 'config.data.image_processor',
    'aspect': 'config.data.image_aspect',
}
_PIPELINE_FIELDS = {
    'seq_len': 'config.data.seq_len',
    'global_batch_size': 'config.train.global_batch',
    'seed': 'config.data.shuffle_seed',
    # valid_windows = eval_batches * global_batch.
    'valid_windows': 'config.train.eval_batches',
    'separator': 'config.data.doc_separator',
    'max_tokens': 'config.data.max_tokens',
    'max_valid_tokens': 'config.data.max_valid_tokens',
    'cache_dir': 'config.data.cache_dir',
}
# The argument an error message starts with: 'seq_len=0: ...', 'path: ...',
# 'tfds_name is empty ...'.
_LEADING_NAME = re.compile(r'([a-z_][a-z0-9_]*)\b')
_BACKTICKED = re.compile(r'`([a-z_][a-z0-9_]*)`')


def _source_fields(kind: str, *, valid: bool) -> dict[str, str]:
  """Argument -> config field of the training or validation source."""
  split = 'tfds_eval_split' if valid else 'tfds_train_split'
  path = 'eval_path' if valid else 'train_path'
  return {**_SOURCE_FIELDS, 'path': f'config.data.{path}',
          'tfds_split': f'config.data.{split}',
          # The default when a message names no argument (a bad record).
          '': (f'config.data.{split}' if kind == 'tfds' else
               'config.data.synthetic' if kind == 'synthetic' else
               f'config.data.{path}')}


def config_error(error: Exception,
                 fields: Mapping[str, str]) -> ValueError | FileNotFoundError:
  """`error` with the config field of the argument it names in front.

  Args:
    error: a ValueError or FileNotFoundError of sources / tokenizer /
      pipeline, whose message starts with the argument at fault.
    fields: argument name -> config field; '' is the field of messages that
      start with no known argument (e.g. with a file name).

  Returns:
    An error of the same kind (ValueError subclasses such as
    UnicodeDecodeError become ValueError): '<field>: <message>', with every
    `name` in the message replaced by its field.
  """
  message = str(error)
  leading = _LEADING_NAME.match(message)
  name = leading.group(1) if leading else ''
  field = fields.get(name) or fields.get('')
  message = _BACKTICKED.sub(lambda m: fields.get(m.group(1), m.group(0)),
                            message)
  if field:
    message = f'{field}: {message}'
  kind = FileNotFoundError if isinstance(error, FileNotFoundError) else (
      ValueError)
  return kind(message)


@contextlib.contextmanager
def _fields(fields: Mapping[str, str] | Callable[[str], Mapping[str, str]]
            ) -> Iterator[None]:
  """Re-raises the block's errors through `config_error`.

  Args:
    fields: the mapping, or a function of the message that picks it.
  """
  try:
    yield
  except (ValueError, FileNotFoundError) as e:
    table = fields(str(e)) if callable(fields) else fields
    # The library's frames stay in the traceback; its own cause (a
    # JSONDecodeError, a UnicodeDecodeError) stays the cause.
    raise config_error(e, table).with_traceback(e.__traceback__) from (
        e.__cause__)


def build_data(config: ml_collections.ConfigDict,
               workdir: str) -> pipeline_lib.Pipeline:
  """Source -> tokenizer (loaded or trained and cached) -> grain pipeline.

  Args:
    config: the run's config (`config.data`, `config.model.vocab_size`,
      `config.train.global_batch` and `config.train.eval_batches`).
    workdir: the run's directory: the tokenizer trained when
      `config.data.tokenizer` is '' ('sentencepiece') and the token cache
      (unless `config.data.cache_dir` is set) live there.

  Returns:
    The Pipeline.

  Raises:
    FileNotFoundError: a data path or the tokenizer file (a .model, or an
      HF directory's tokenizer.json) does not exist.
    ValueError: unreadable data, an unknown `config.data.tokenizer_type`,
      or a setting the data cannot satisfy.
      Both start with the config field to change.
  """
  data = config.data
  if data.source == 'llava':
    return build_llava_data(config)
  # Before any source or tokenizer is opened: a typo fails at once.
  if data.tokenizer_type not in tokenizer_lib.TOKENIZER_TYPES:
    choices = ' | '.join(repr(t) for t in tokenizer_lib.TOKENIZER_TYPES)
    raise ValueError(
        f'config.data.tokenizer_type={data.tokenizer_type!r}: expected one '
        f'of {choices}.')
  if data.tokenizer_type == 'hf' and not data.tokenizer:
    raise ValueError(
        "config.data.tokenizer: empty, but config.data.tokenizer_type='hf' "
        'reads the tokenizer files of a Hugging Face model directory; set '
        'config.data.tokenizer to that directory (only SentencePiece '
        "tokenizers are trained: config.data.tokenizer_type='sentencepiece')."
    )
  # The shard order (algorithms.md §6.3): each split's sorted files
  # permuted by np.random.default_rng(shard_seed), as LibMoE permutes every
  # SlimPajama split's shard list with default_rng(123); the tokenizer
  # trained below reads the training text in that order.
  common = dict(text_field=data.text_field, doc_mode=data.doc_mode,
                tfds_name=data.tfds_name,
                tfds_data_dir=data.tfds_data_dir or None,
                synthetic=data.synthetic.to_dict(),
                shard_seed=data.get('shard_seed'))
  train_fields = _source_fields(data.source, valid=False)
  with _fields(train_fields):
    source = sources_lib.make_source(
        data.source, path=data.train_path or None,
        tfds_split=data.tfds_train_split, **common)
  valid_source = None
  valid_fields = _source_fields(data.source, valid=True)
  with _fields(valid_fields):
    if data.source == 'tfds':
      valid_source = sources_lib.make_source(
          'tfds', tfds_split=data.tfds_eval_split, **common)
    elif data.source != 'synthetic' and data.eval_path:
      valid_source = sources_lib.make_source(
          data.source, path=data.eval_path, **common)

  if data.tokenizer_type == 'hf':
    with _fields(_TOKENIZER_FIELDS):
      tokenizer = tokenizer_lib.load_hf_tokenizer(data.tokenizer)
  elif data.tokenizer:
    with _fields(_TOKENIZER_FIELDS):
      try:
        tokenizer = tokenizer_lib.load_tokenizer(data.tokenizer)
      except FileNotFoundError as e:
        raise FileNotFoundError(
            f"{e} (Or set config.data.tokenizer='' to train a tokenizer "
            'into the workdir.)') from None
  else:
    # Errors of the training text come from the training source.
    with _fields({**train_fields, **_TOKENIZER_FIELDS,
                  'texts': train_fields['']}):
      tokenizer = tokenizer_lib.train_or_reuse_tokenizer(
          workdir, source, vocab_size=data.vocab_size,
          split_digits=data.split_digits, separator=data.doc_separator)
  _check_vocab(tokenizer, config.model.vocab_size,
               hf=data.tokenizer_type == 'hf')

  def pipeline_fields(message: str) -> dict[str, str]:
    # A bad record names its file: the validation files' field if it is one
    # of them, else the training files'.
    valid_paths = getattr(valid_source, 'paths', ())
    own = (valid_fields if any(p in message for p in valid_paths) else
           train_fields)
    return {**own, **_PIPELINE_FIELDS, 'valid_source': valid_fields['']}

  with _fields(pipeline_fields):
    return pipeline_lib.build_pipeline(
        source, tokenizer, seq_len=data.seq_len,
        global_batch_size=config.train.global_batch, seed=data.shuffle_seed,
        valid_source=valid_source,
        valid_windows=config.train.eval_batches * config.train.global_batch,
        separator=data.doc_separator, max_tokens=data.max_tokens or None,
        max_valid_tokens=data.max_valid_tokens,
        cache_dir=data.cache_dir or os.path.join(workdir, 'cache'))


def _check_vocab(tokenizer, model_vocab_size: int, *, hf: bool) -> None:
  """ValueError naming config.data.tokenizer unless its ids fit the model.

  Args:
    tokenizer: the loaded tokenizer (`path`, `vocab_size`).
    model_vocab_size: config.model.vocab_size, the embedding's rows.
    hf: an HF tokenizer (ids only need to fit the embedding: HF checkpoints
      often pad it past len(tokenizer), Qwen2 has 151936 rows for 151665
      tokens), else a SentencePiece one (the model is sized for it: equal).
  """
  fits = (tokenizer.vocab_size <= model_vocab_size if hf else
          tokenizer.vocab_size == model_vocab_size)
  if fits:
    return
  # An HF tokenizer's added tokens are ids too: len(tokenizer) counts them.
  what = 'tokens (len(tokenizer), added tokens included)' if hf else 'pieces'
  fix = ("the model's embedding must have at least that many rows" if hf
         else f'set --config.data.vocab_size={tokenizer.vocab_size} (the '
         "model's vocabulary follows it)")
  raise ValueError(
      f'config.data.tokenizer: the tokenizer {tokenizer.path} has '
      f'{tokenizer.vocab_size} {what} but config.model.vocab_size='
      f'{model_vocab_size}; {fix}')


def build_llava_data(config: ml_collections.ConfigDict):
  """The VLM pipeline (data.source='llava'): LLaVA-format conversations and
  their images (moe_jax/data/llava.py), with the LLM's tokenizer and the
  tower's image preprocessing, `<image>` expanded to the tower's feature
  rows.

  Raises:
    FileNotFoundError, ValueError: as build_data; messages start with the
      config field to change (config.data.image_processor for anything
      read from the preprocessor config).
  """
  data = config.data
  with _fields(_TOKENIZER_FIELDS):
    tokenizer = tokenizer_lib.load_hf_tokenizer(data.tokenizer)
  _check_vocab(tokenizer, config.model.vocab_size, hf=True)
  # A message that names no argument ('<file>: size=...') comes from the
  # preprocessor config's contents.
  with _fields({**_LLAVA_FIELDS, '': _LLAVA_FIELDS['path_or_dict']}):
    spec = images_lib.ImageSpec.from_preprocessor_config(
        data.image_processor, aspect=data.image_aspect)

  def llava_fields(message: str) -> dict[str, str]:
    # A message that starts with a file names a sample of a JSON file, or
    # that sample's image.
    if "): image '" in message:
      own = _LLAVA_FIELDS['image_dir']
    elif data.eval_path and message.startswith(os.fspath(data.eval_path)):
      own = _LLAVA_FIELDS['valid_json']
    else:
      own = _LLAVA_FIELDS['train_json']
    return {**_LLAVA_FIELDS, '': own}

  with _fields(llava_fields):
    return llava_lib.build_llava_pipeline(
        data.train_path, data.image_dir, tokenizer, spec,
        template=data.template, seq_len=data.seq_len,
        global_batch_size=config.train.global_batch,
        image_token_id=config.vlm.image_token_id,
        num_image_tokens=vision.num_features(
            config.vision.kind, config.vision.image_size,
            config.vision.patch_size, config.vision.feature_select),
        seed=data.shuffle_seed, valid_json=data.eval_path or None,
        valid_samples=config.train.eval_batches * config.train.global_batch,
        too_long=data.too_long)


def load_run_tokenizer(config: ml_collections.ConfigDict, workdir: str):
  """The tokenizer a run trained with, loaded; never trains one.

  For scoring a trained run (zero-shot evaluation, the lm-eval adapter):
  the tokenizer of `config.data.tokenizer` (a .model file or an HF model
  directory), or the one training cached in the workdir when that field is
  ''.

  Raises:
    FileNotFoundError: the tokenizer file is missing (naming the config
      field, or the workdir's cached model and how it is made).
  """
  data = config.data
  if data.tokenizer_type == 'hf':
    with _fields(_TOKENIZER_FIELDS):
      return tokenizer_lib.load_hf_tokenizer(data.tokenizer)
  if data.tokenizer:
    with _fields(_TOKENIZER_FIELDS):
      return tokenizer_lib.load_tokenizer(data.tokenizer)
  path = tokenizer_lib.default_model_path(workdir, data.vocab_size)
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f'{path}: the workdir has no tokenizer (config.data.tokenizer is '
        "'', so training writes one there on its first start); train first, "
        'or set config.data.tokenizer to the .model file the run used')
  return tokenizer_lib.load_tokenizer(path)
