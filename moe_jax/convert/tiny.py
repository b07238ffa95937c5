"""Tiny random Hugging Face models, written without torch.

    write_tiny_hf('/tmp/tiny_llama', family='llama')
    python -m moe_jax.convert tiny --family=llama --out=/tmp/tiny_llama

writes a directory that `transformers.AutoModelForCausalLM` and
`AutoTokenizer` load offline, and that `hf_import.import_hf` (and so
`config.init.hf_path`) reads back exactly:

  tokenizer  a byte-level BPE of `vocab_size` tokens trained with the
             `tokenizers` library on the built-in synthetic corpus
             (moe_jax/data/sources.py), saved by transformers'
             PreTrainedTokenizerFast (tokenizer.json + tokenizer_config.json).
             Llama: GPT-2's pre-tokenizer, bos '<s>', eos '</s>'. Phi-3:
             GPT-2's pre-tokenizer, bos '<s>', eos and pad '<|endoftext|>',
             and the chat tokens '<|system|>', '<|user|>', '<|assistant|>',
             '<|end|>' plus '<image>' as added special tokens (never split,
             never merged), with Phi-3's chat template. Qwen:
             Qwen2's (NFC, digits split one by one), '<|endoftext|>' as eos
             and pad, no bos, because transformers 5 loads a 'qwen2'
             directory with its own Qwen2Tokenizer pipeline, whatever the
             tokenizer.json says
  weights    a dense TransformerLM with the family's options (the ones
             families.model_kwargs derives from the config.json written
             here), every weight and bias N(0, 0.02²), norm scales
             1 + N(0, 0.02²) (not exactly 1, so that a swapped norm shows
             in a round trip), written by hf_export.export_hf(to='dense'),
             or to='phi3' (fused qkv_proj / gate_up_proj) for Phi-3

Families: 'llama' (no biases), 'qwen2' (q/k/v biases), 'qwen3' (per-head
q/k RMSNorm) and, in CHAT_FAMILIES, 'phi3' (Phi-3 layout and chat tokens:
the LLM of the tiny VLM stages). These models are random: for CPU
quickstarts and tests of the import -> train / upcycle -> export path, not
for quality.

Dimension legend: V vocabulary, D model width, H heads, K kv heads, Dh head
width, I MLP width, L layers.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from moe_jax.convert import families
from moe_jax.convert import hf_export
from moe_jax.data import sources
from moe_jax.models import decoder
from moe_jax.validation import require

# Plain decoder families: special tokens bos / eos / pad only.
FAMILIES = ('llama', 'qwen2', 'qwen3')
# Families whose tokenizer also has chat tokens (and '<image>').
CHAT_FAMILIES = ('phi3',)
# family -> (model_type, architecture) of its config.json.
_ARCHITECTURES = {
    'llama': ('llama', 'LlamaForCausalLM'),
    'qwen2': ('qwen2', 'Qwen2ForCausalLM'),
    'qwen3': ('qwen3', 'Qwen3ForCausalLM'),
    'phi3': ('phi3', 'Phi3ForCausalLM'),
}
# family -> named special tokens of the tokenizer (tokenizer_config.json).
SPECIAL_TOKENS = {
    'llama': {'bos_token': '<s>', 'eos_token': '</s>'},
    'qwen2': {'eos_token': '<|endoftext|>', 'pad_token': '<|endoftext|>'},
    'qwen3': {'eos_token': '<|endoftext|>', 'pad_token': '<|endoftext|>'},
    'phi3': {'bos_token': '<s>', 'eos_token': '<|endoftext|>',
             'pad_token': '<|endoftext|>'},
}
# family -> further special tokens (Phi-3's chat turns; the VLM's image
# placeholder, which data/ expands into the image's feature rows).
EXTRA_SPECIAL_TOKENS = {
    'phi3': ('<|system|>', '<|user|>', '<|assistant|>', '<|end|>',
             '<image>'),
}
# Phi-3-mini's chat template (tokenizer_config.json of microsoft/Phi-3-mini).
CHAT_TEMPLATES = {
    'phi3': ("{% for message in messages %}{{'<|' + message['role'] + '|>' + "
             "'\n' + message['content'] + '<|end|>\n'}}{% endfor %}"
             "{% if add_generation_prompt %}{{'<|assistant|>\n'}}"
             "{% else %}{{eos_token}}{% endif %}"),
}
# transformers' Qwen2Tokenizer pre-tokenizer (tokenization_qwen2.py).
QWEN_PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# Byte-level BPE starts from the 256 byte symbols.
_BYTES = 256
INIT_STD = 0.02


def hf_config(family: str, *, vocab_size: int, d_model: int, num_layers: int,
              num_heads: int, num_kv_heads: int, head_dim: int,
              intermediate_size: int, max_position_embeddings: int,
              rope_theta: float, norm_eps: float, tie_embeddings: bool
              ) -> dict[str, Any]:
  """The config.json fields the family's import reads (families.py)."""
  require(family in FAMILIES + CHAT_FAMILIES, 'family',
          f'one of {FAMILIES + CHAT_FAMILIES}', family)
  model_type, arch = _ARCHITECTURES[family]
  if family == 'phi3':
    # Phi3Config has no head_dim: it is hidden_size / num_attention_heads.
    require(head_dim * num_heads == d_model, 'head_dim',
            f'd_model / num_heads = {d_model / num_heads} (Phi-3 derives it)',
            head_dim)
    return dict(
        architectures=[arch], model_type=model_type, vocab_size=vocab_size,
        hidden_size=d_model, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads, hidden_act='silu',
        rms_norm_eps=norm_eps, rope_theta=rope_theta,
        partial_rotary_factor=1.0,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_embeddings)
  return dict(
      architectures=[arch], model_type=model_type, vocab_size=vocab_size,
      hidden_size=d_model, intermediate_size=intermediate_size,
      num_hidden_layers=num_layers, num_attention_heads=num_heads,
      num_key_value_heads=num_kv_heads, head_dim=head_dim,
      hidden_act='silu', rms_norm_eps=norm_eps, rope_theta=rope_theta,
      max_position_embeddings=max_position_embeddings,
      tie_word_embeddings=tie_embeddings, attention_bias=False)


def random_params(kwargs: dict[str, Any], seed: int) -> dict:
  """Float32 parameters of TransformerLM(**kwargs), drawn as the module
  docstring says, in sorted path order (reproducible for a seed)."""
  model = decoder.TransformerLM(**kwargs)
  shapes = nn.unbox(jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, 2), jnp.int32))))['params']
  return draw_params(shapes, seed)


def draw_params(shapes, seed: int) -> dict:
  """Values for a tree of shapes: N(0, INIT_STD²), norm scales 1 + N(0,
  INIT_STD²), drawn in sorted path order (reproducible for a seed)."""
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    values = rng.normal(0.0, INIT_STD, leaf.shape).astype(np.float32)
    if getattr(path[-1], 'key', None) == 'scale':
      values += 1.0
    return jnp.asarray(values)

  return jax.tree_util.tree_map_with_path(draw, shapes)


def train_tokenizer(vocab_size: int, family: str = 'llama', *,
                    num_docs: int = 1000, seed: int = 0):
  """A byte-level BPE `tokenizers.Tokenizer` of at most `vocab_size` tokens
  on the synthetic corpus, in the family's style (SPECIAL_TOKENS first)."""
  import tokenizers  # pylint: disable=g-import-not-at-top
  specials = list(dict.fromkeys(
      list(SPECIAL_TOKENS[family].values()) +
      list(EXTRA_SPECIAL_TOKENS.get(family, ()))))
  require(vocab_size >= _BYTES + len(specials), 'vocab_size',
          f'>= {_BYTES + len(specials)} (256 byte symbols + special '
          'tokens)', vocab_size)
  corpus = sources.make_source('synthetic', synthetic=dict(
      num_docs=num_docs, num_domains=4, seed=seed))
  pre = tokenizers.pre_tokenizers
  tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE())
  if family in ('llama', 'phi3'):
    tokenizer.pre_tokenizer = pre.ByteLevel(add_prefix_space=False)
  else:
    tokenizer.normalizer = tokenizers.normalizers.NFC()
    tokenizer.pre_tokenizer = pre.Sequence([
        pre.Split(tokenizers.Regex(QWEN_PRETOKENIZE_REGEX),
                  behavior='isolated', invert=False),
        pre.ByteLevel(add_prefix_space=False, use_regex=False)])
  tokenizer.decoder = tokenizers.decoders.ByteLevel()
  # The byte alphabet up front: any text encodes, no unknown token needed.
  tokenizer.train_from_iterator(
      (doc.text for doc in corpus.documents()),
      tokenizers.trainers.BpeTrainer(
          vocab_size=vocab_size, special_tokens=specials,
          initial_alphabet=pre.ByteLevel.alphabet(), show_progress=False))
  return tokenizer


def save_tokenizer(tokenizer, directory: str, family: str = 'llama', *,
                   model_max_length: int) -> None:
  """tokenizer.json + tokenizer_config.json as transformers writes them."""
  # transformers is a dependency of the library; torch is not needed here.
  import transformers  # pylint: disable=g-import-not-at-top
  extra = {}
  if family in EXTRA_SPECIAL_TOKENS:
    extra['extra_special_tokens'] = list(EXTRA_SPECIAL_TOKENS[family])
  fast = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tokenizer, model_max_length=model_max_length,
      **SPECIAL_TOKENS[family], **extra)
  fast.save_pretrained(directory)
  # transformers 5 names its class 'TokenizersBackend', which 4.x does not
  # know; 'PreTrainedTokenizerFast' loads the same tokenizer.json in both.
  path = os.path.join(directory, 'tokenizer_config.json')
  with open(path, encoding='utf-8') as f:
    config = json.load(f)
  config['tokenizer_class'] = 'PreTrainedTokenizerFast'
  config.pop('backend', None)
  if family in CHAT_TEMPLATES:
    # In tokenizer_config.json (read by 4.x and 5.x; 5.x would otherwise
    # write chat_template.jinja, which export does not copy).
    config['chat_template'] = CHAT_TEMPLATES[family]
  with open(path, 'w', encoding='utf-8') as f:
    json.dump(config, f, indent=2)


def write_tiny_hf(out_dir: str, family: str = 'llama', *,
                  vocab_size: int = 512, d_model: int = 64,
                  num_layers: int = 2, num_heads: int = 4,
                  num_kv_heads: int = 2, head_dim: int = 16,
                  intermediate_size: int = 128,
                  max_position_embeddings: int = 512,
                  rope_theta: float = 10000.0, norm_eps: float = 1e-6,
                  tie_embeddings: bool = False, seed: int = 0,
                  progress: bool = False) -> str:
  """Writes a tiny random HF model directory `out_dir` (must not exist).

  Args:
    out_dir: the directory to create (written whole or not at all).
    family: 'llama' | 'qwen2' | 'qwen3' | 'phi3'.
    vocab_size: V, of the model and (at most, if the corpus runs out of
      merges) of the tokenizer.
    d_model, num_layers, num_heads, num_kv_heads, head_dim,
    intermediate_size: D, L, H, K (GQA when K < H), Dh, I.
    max_position_embeddings, rope_theta, norm_eps, tie_embeddings: the
      config.json fields of those names.
    seed: seed of the weights and of the tokenizer's corpus.
    progress: show export's progress bar.

  Returns:
    out_dir.

  Raises:
    ValueError: a field out of range (named), FileExistsError: out_dir
      exists.
  """
  if os.path.exists(out_dir):
    raise FileExistsError(f'{out_dir} exists; tiny writes a new directory')
  hf = hf_config(family, vocab_size=vocab_size, d_model=d_model,
                 num_layers=num_layers, num_heads=num_heads,
                 num_kv_heads=num_kv_heads, head_dim=head_dim,
                 intermediate_size=intermediate_size,
                 max_position_embeddings=max_position_embeddings,
                 rope_theta=rope_theta, norm_eps=norm_eps,
                 tie_embeddings=tie_embeddings)
  # The options import will derive from this config.json: what the
  # weights must fit.
  kwargs = families.model_kwargs(hf, family)
  tokenizer = train_tokenizer(vocab_size, family, seed=seed)
  params = random_params(kwargs, seed)
  parent = os.path.dirname(os.path.abspath(out_dir))
  os.makedirs(parent, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=parent, prefix='.tiny-tok-') as tok:
    save_tokenizer(tokenizer, tok, family,
                   model_max_length=max_position_embeddings)
    special = SPECIAL_TOKENS[family]
    eos = tokenizer.token_to_id(special['eos_token'])
    # Qwen's config.json names its eos as bos too (it has no bos token).
    bos = (tokenizer.token_to_id(special['bos_token'])
           if 'bos_token' in special else eos)
    base = dict(bos_token_id=bos, eos_token_id=eos,
                max_position_embeddings=max_position_embeddings)
    if family in CHAT_FAMILIES:
      base['pad_token_id'] = tokenizer.token_to_id(special['pad_token'])
    hf_export.export_hf(kwargs, params, {},
                        to='phi3' if family == 'phi3' else 'dense',
                        out_dir=out_dir, tokenizer_dir=tok, base_config=base,
                        progress=progress)
  return out_dir
