"""Exporting a dense moe_jax Llava as a transformers LLaVA directory.

    export_llava(out_dir, llava_kwargs, params, tokenizer_dir=LLM_DIR,
                 image_processor_config=TOWER_DIR/preprocessor_config.json)

writes a `LlavaForConditionalGeneration` directory that transformers 4.x /
5.x and lmms-eval's `llava_hf` model load offline (formats.md §8.2):

  config.json              model_type 'llava': vision_config (the tower's
                           SiglipVisionModel / CLIPVisionModel config,
                           vision_families.hf_vision_config), text_config
                           (the LLM's Phi-3 / Llama / Qwen2 / Qwen3 config,
                           hf_export.hf_config), image_token_id (and the
                           legacy image_token_index), vision_feature_layer,
                           vision_feature_select_strategy ('full' for
                           SigLIP, which has no class token; 'default' for
                           CLIP with feature_select 'patch', which drops the
                           class token; 'full' keeps it),
                           projector_hidden_act 'gelu',
                           multimodal_projector_bias true, image_seq_length N
  model.safetensors        llava-hf's hub layout (which transformers 5 maps
                           onto its module names on load):
                             vision_tower.vision_model.*   the tower
                             multi_modal_projector.linear_{1,2}.{weight,bias}
                             language_model.model.*        the LLM
                             language_model.lm_head.weight (untied LLMs)
  tokenizer files          copied from the LLM directory; its '<image>' must
                           be one token whose id is the model's
                           image_token_id (refused otherwise: the stock
                           processor finds image positions by that token)
  chat template            the training conversation template ('phi35' |
                           'plain', data/conversation.py) as a Jinja
                           template, in tokenizer_config.json (lmms-eval's
                           llava_hf applies the tokenizer's) and
                           chat_template.jinja (the processor's); string
                           content or a list of {'type': 'image' | 'text'}
                           items, images first as in training ('<image>\\n'
                           then the text); bos in front when the tokenizer
                           does not add it itself (training always starts
                           with bos)
  preprocessor_config.json copied from the tower's image processor
  processor_config.json    LlavaProcessor's fields as transformers 5.24 saves
                           them: patch_size, num_additional_image_tokens (1
                           for CLIP's class token), vision_feature_select_
                           strategy, image_token '<image>', and the image
                           processor's fields nested under 'image_processor'
                           (so the processor expands '<image>' to exactly N
                           image tokens)

Refused (ValueError naming the field): an MoE tower or projector
(tower_ffn / projector_ffn 'moe') and S² multi-scale features, which the
stock class cannot hold: the lmms-eval plugin (eval/lmms, model
'moe_jax_vlm') evaluates such runs natively; an MoE LLM (HF LLaVA's
text_config here is a dense family); a tokenizer without '<image>'.

Not carried: LLaVA's 'pad' aspect (expand2square before the processor),
which HF's processor does not do: an exported PFT / SFT model sees
resized, not padded, images through AutoProcessor.

The directory is written whole or not at all (a temporary sibling renamed
at the end), as hf_export does.

Dimension legend: D_v tower width, W LLM width (= projector width), V
vocabulary, N image feature rows.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any, Iterator, Mapping

import numpy as np
from tqdm import tqdm

from moe_jax.convert import families
from moe_jax.convert import hf_export
from moe_jax.convert import hf_import
from moe_jax.convert import llava as llava_import
from moe_jax.convert import safetensors_io
from moe_jax.convert import vision_families
from moe_jax.data import tokenizer as tokenizer_lib
from moe_jax.models import vision
from moe_jax.validation import require

IMAGE_TOKEN = '<image>'
# The LLM's HF layouts a LLaVA text_config can be written as.
TEXT_TARGETS = ('phi3', 'dense')
# Key prefixes written (llava-hf hub layout; import_llava reads it).
VISION_PREFIX = 'vision_tower.' + vision_families.EXPORT_PREFIX
LLM_PREFIX, LM_HEAD, PROJECTOR_PREFIX = llava_import.LAYOUTS['saved']
# Tokenizer files copied besides hf_export.TOKENIZER_FILES.
EXTRA_TOKENIZER_FILES = ('added_tokens.json', 'vocab.json', 'merges.txt')
PLUGIN_HINT = ("the lmms-eval plugin (eval/lmms, model 'moe_jax_vlm') "
               'evaluates such runs natively')
# How a run gets a tokenizer with '<image>' (appended to refusals).
TOKEN_FIX = (
    "; fix: train from an LLM directory whose tokenizer has '<image>' as an "
    "added special token (tiny:phi3's has; for a hub LLM, add it with "
    "tokenizer.add_special_tokens({'additional_special_tokens': "
    "['<image>']}), save_pretrained it into the LLM directory, resizing the "
    'embedding if its id is past the vocabulary, and start the VLM stages '
    f'from there), or skip the export: {PLUGIN_HINT}')
# Training templates (data/conversation.py) as chat templates. Content is a
# string (lmms-eval's llava_hf puts '<image>\n' in it) or a list of
# {'type': 'image'} / {'type': 'text', 'text': ...} items; images go first,
# each as '<image>\n' (phi35) or '<image>' (plain), as training places them.
_CONTENT = (
    "{%- macro content(c, sep) -%}"
    "{%- if c is string -%}{{ c }}{%- else -%}"
    "{%- for item in c if item['type'] == 'image' -%}{{ '<image>' + sep }}"
    "{%- endfor -%}"
    "{%- for item in c if item['type'] == 'text' -%}{{ item['text'] }}"
    "{%- endfor -%}{%- endif -%}{%- endmacro -%}")
CHAT_TEMPLATES = {
    # LibMoE conv_phi_35_instruct: the default system prompt unless the
    # conversation brings its own.
    'phi35': _CONTENT + (
        "{{ bos }}"
        "{%- if messages[0]['role'] != 'system' -%}"
        "{{ '<|system|>\nYou are a helpful assistant.<|end|>\n' }}"
        "{%- endif -%}"
        "{%- for m in messages -%}"
        "{{ '<|' + m['role'] + '|>\n' }}{{ content(m['content'], '\n') }}"
        "{{ '<|end|>\n' }}{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|assistant|>\n' }}"
        "{%- endif -%}"),
    # LLaVA conv_llava_plain: the image (and any text) then the caption and
    # '\n'; no system prompt, no role markers.
    'plain': _CONTENT + (
        "{{ bos }}"
        "{%- for m in messages if m['role'] != 'system' -%}"
        "{{ content(m['content'], '') }}"
        "{%- if m['role'] == 'assistant' -%}{{ '\n' }}{%- endif -%}"
        "{%- endfor -%}"),
}


def check_exportable(llava_kwargs: Mapping[str, Any],
                     text_target: str = 'phi3') -> None:
  """Raises ValueError naming what LlavaForConditionalGeneration cannot hold.

  Args:
    llava_kwargs: Llava keyword arguments (models/llava.py).
    text_target: 'phi3' | 'dense' (the LLM's layout).
  """
  for field in ('tower_ffn', 'projector_ffn'):
    value = llava_kwargs.get(field, 'dense')
    if value != 'dense':
      raise ValueError(
          f"{field}={value!r}: transformers' LlavaForConditionalGeneration "
          'has a dense vision tower and a dense mlp2x_gelu projector, so the '
          f'stock class cannot hold an MoE {field.split("_")[0]}; '
          f'{PLUGIN_HINT}')
  scales = tuple(llava_kwargs.get('s2_scales', (1,)))
  if scales != (1,):
    raise ValueError(
        f"s2_scales={scales}: transformers' LlavaForConditionalGeneration "
        'has no S² multi-scale features, so the stock class cannot hold '
        f'this model; {PLUGIN_HINT}')
  require(text_target in TEXT_TARGETS, 'text_target',
          f'one of {TEXT_TARGETS}', text_target)
  llm = llava_kwargs['llm']
  if not llm.get('dense_ffn'):
    raise ValueError(
        'llm.dense_ffn=False: the LLM is MoE, and LLaVA export writes a '
        f'dense text_config ({TEXT_TARGETS}); {PLUGIN_HINT}')
  hf_export.check_exportable(llm, text_target)
  tower = llava_kwargs['tower']
  vision_families.hf_vision_config(tower)                # kind, activation
  require(tower.get('feature_select', 'patch') in vision.FEATURE_SELECTS,
          'tower.feature_select', f'one of {vision.FEATURE_SELECTS}',
          tower.get('feature_select'))
  require(llava_kwargs['projector_width'] == llm['d_model'],
          'projector_width', f"the LLM's d_model={llm['d_model']}",
          llava_kwargs['projector_width'])
  image_token = int(llava_kwargs['image_token_id'])
  if not 0 <= image_token < llm['vocab_size']:
    raise ValueError(
        f'image_token_id={image_token}: outside the LLM\'s vocabulary '
        f"[0, {llm['vocab_size']}) (the run's tokenizer has no '<image>'); "
        'HF LLaVA embeds the image token and its processor finds image '
        f"positions by '<image>'{TOKEN_FIX}")


def feature_strategy(tower: Mapping[str, Any]) -> str:
  """HF vision_feature_select_strategy of a VisionTower's feature_select."""
  if tower['kind'] == 'clip' and tower.get('feature_select',
                                           'patch') == 'patch':
    return 'default'                                  # drops the class token
  # SigLIP has no class token: its features are all rows either way.
  return 'full'


def text_target_of(tokenizer_dir: str | None) -> str:
  """'phi3' when the LLM directory's config.json is Phi-3, else 'dense'."""
  path = os.path.join(tokenizer_dir or '', 'config.json')
  if tokenizer_dir and os.path.isfile(path):
    hf = hf_import.read_hf_config(tokenizer_dir)
    if hf.get('architectures') and families.ARCHITECTURES.get(
        hf['architectures'][0]) == 'phi3':
      return 'phi3'
  return 'dense'


def _base_config(tokenizer_dir: str | None) -> dict[str, Any]:
  """Token ids and context length of the LLM directory's config.json."""
  if not tokenizer_dir or not os.path.isfile(
      os.path.join(tokenizer_dir, 'config.json')):
    return {}
  hf = hf_import.read_hf_config(tokenizer_dir)
  return {k: hf[k] for k in ('bos_token_id', 'eos_token_id', 'pad_token_id',
                             'max_position_embeddings') if k in hf}


def hf_llava_config(llava_kwargs: Mapping[str, Any], text_target: str,
                    base: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """config.json of the LlavaForConditionalGeneration export."""
  tower, llm = llava_kwargs['tower'], llava_kwargs['llm']
  text = hf_export.hf_config(llm, text_target, base)
  strategy = feature_strategy(tower)
  n = vision.num_features(tower['kind'], tower['image_size'],
                          tower['patch_size'],
                          'patch' if strategy == 'default' else 'full')
  image_token = int(llava_kwargs['image_token_id'])
  return {
      'architectures': ['LlavaForConditionalGeneration'],
      'model_type': 'llava', 'dtype': 'float32',
      'vision_config': vision_families.hf_vision_config(tower),
      'text_config': text,
      'image_token_id': image_token, 'image_token_index': image_token,
      'image_seq_length': n,
      'vision_feature_layer': int(tower.get('feature_layer', -2)),
      'vision_feature_select_strategy': strategy,
      'projector_hidden_act': 'gelu', 'multimodal_projector_bias': True,
      'tie_word_embeddings': bool(llm.get('tie_embeddings')),
  }


def llava_tensors(llava_kwargs: Mapping[str, Any], params: Mapping,
                  text_target: str) -> Iterator[tuple[str, np.ndarray]]:
  """Yields (HF key, torch-layout float32 array): tower, projector, LLM."""
  tower = {k: v for k, v in llava_kwargs['tower'].items()
           if k not in ('feature_layer', 'feature_select')}
  yield from vision_families.tower_tensors(tower, params['vision'],
                                          VISION_PREFIX)
  ffn = params['projector']['ffn']['ffn']
  d_in = llava_kwargs['tower']['d_model']
  width = llava_kwargs['projector_width']
  for name, kernel, bias, shape in (('linear_1', 'w_in', 'b_in',
                                     (d_in, width)),
                                    ('linear_2', 'w_out', 'b_out',
                                     (width, width))):
    w = np.asarray(ffn[kernel], np.float32)
    require(w.shape == shape, f'projector/ffn/ffn/{kernel}', f'shape {shape}',
            w.shape)
    yield f'{PROJECTOR_PREFIX}{name}.weight', np.ascontiguousarray(w.T)
    yield f'{PROJECTOR_PREFIX}{name}.bias', np.asarray(ffn[bias], np.float32)
  for key, value in hf_export.hf_tensors(llava_kwargs['llm'], params['llm'],
                                         text_target):
    if key == 'lm_head.weight':
      yield LM_HEAD, value
    else:
      require(key.startswith('model.'), 'LLM key', "a key under 'model.'",
              key)
      yield LLM_PREFIX + key[len('model.'):], value


def check_image_token(tokenizer_dir: str | None, image_token_id: int) -> None:
  """The tokenizer encodes '<image>' as the one token image_token_id."""
  fix = TOKEN_FIX
  if not tokenizer_dir or not os.path.isfile(
      os.path.join(tokenizer_dir, 'tokenizer.json')):
    raise ValueError(f'tokenizer_dir={tokenizer_dir!r}: no tokenizer.json; '
                     "LLaVA export needs the LLM's tokenizer (with "
                     f"'{IMAGE_TOKEN}') for the processor{fix}")
  tokenizer = tokenizer_lib.HFTokenizer(tokenizer_dir)
  ids = tokenizer.encode(IMAGE_TOKEN)
  if ids != [image_token_id]:
    have = (f"encodes '{IMAGE_TOKEN}' as {ids}" if len(ids) != 1 else
            f"has '{IMAGE_TOKEN}' as id {ids[0]}")
    raise ValueError(
        f'tokenizer_dir={tokenizer_dir!r}: the tokenizer {have}, but the '
        f"model's image_token_id is {image_token_id}: LlavaProcessor marks "
        f"image positions with the single token '{IMAGE_TOKEN}'{fix}")


def _copy_tokenizer(tokenizer_dir: str, out_dir: str) -> None:
  hf_export.copy_tokenizer_files(tokenizer_dir, out_dir)
  for name in EXTRA_TOKENIZER_FILES:
    if os.path.isfile(os.path.join(tokenizer_dir, name)):
      shutil.copy2(os.path.join(tokenizer_dir, name), out_dir)


def _read_json(path: str) -> dict[str, Any]:
  with open(path, encoding='utf-8') as f:
    return json.load(f)


def chat_template(template: str, bos: str | None) -> str:
  """The Jinja chat template of a training template; `bos` in front."""
  require(template in CHAT_TEMPLATES, 'template',
          f'one of {tuple(CHAT_TEMPLATES)}', template)
  prefix = "{%- set bos = '' -%}"
  if bos:
    prefix = '{%- set bos = ' + json.dumps(bos) + ' -%}'
  return prefix + CHAT_TEMPLATES[template]


def _adds_bos(directory: str) -> tuple[str | None, bool]:
  """(bos token, whether transformers' tokenizer prepends it itself)."""
  import transformers  # pylint: disable=g-import-not-at-top
  auto = transformers.AutoTokenizer.from_pretrained(directory,
                                                    local_files_only=True)
  bos = auto.bos_token
  if bos is None or auto.bos_token_id is None:
    return None, False
  return bos, auto('x').input_ids[:1] == [auto.bos_token_id]


def _write_processor_files(staging: str, llava_kwargs: Mapping[str, Any],
                           image_processor_config: str, template: str
                           ) -> None:
  """preprocessor_config.json, processor_config.json, the chat template."""
  path = os.fspath(image_processor_config)
  if os.path.isdir(path):
    path = os.path.join(path, 'preprocessor_config.json')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'image_processor_config={path!r}: no such file '
                            '(the tower\'s preprocessor_config.json)')
  image_processor = _read_json(path)
  shutil.copyfile(path, os.path.join(staging, 'preprocessor_config.json'))
  tower = llava_kwargs['tower']
  processor = {
      'image_processor': image_processor,
      'image_token': IMAGE_TOKEN,
      # LlavaProcessor: N = (H / P)(W / P) + this, minus 1 for 'default'.
      'num_additional_image_tokens': int(tower['kind'] == 'clip'),
      'patch_size': int(tower['patch_size']),
      'processor_class': 'LlavaProcessor',
      'vision_feature_select_strategy': feature_strategy(tower),
  }
  vision_families.write_json(os.path.join(staging, 'processor_config.json'),
                             processor)
  bos, adds = _adds_bos(staging)
  text = chat_template(template, None if adds else bos)
  with open(os.path.join(staging, 'chat_template.jinja'), 'w',
            encoding='utf-8') as f:
    f.write(text)
  config_path = os.path.join(staging, 'tokenizer_config.json')
  config = _read_json(config_path) if os.path.isfile(config_path) else {}
  config['chat_template'] = text
  config['processor_class'] = 'LlavaProcessor'
  vision_families.write_json(config_path, config)


def export_llava(out_dir: str, llava_kwargs: Mapping[str, Any],
                 params: Mapping, *, tokenizer_dir: str,
                 image_processor_config: str, template: str = 'phi35',
                 text_target: str | None = None,
                 max_shard_bytes: int = 5 * 2**30,
                 progress: bool = False) -> str:
  """Writes `out_dir` (must not exist) as a LlavaForConditionalGeneration.

  Args:
    out_dir: the directory to create, whole or not at all.
    llava_kwargs: Llava keyword arguments (models/llava.py) with a dense
      tower and projector and a dense LLM.
    params: Llava(**llava_kwargs)'s params: {'vision', 'projector':
      {'ffn': {'ffn': {w_in [D_v, W], b_in [W], w_out [W, W], b_out [W]}}},
      'llm'}.
    tokenizer_dir: the LLM directory (config.data.tokenizer): its tokenizer
      files are copied, its config.json gives token ids and the text
      layout.
    image_processor_config: the tower's preprocessor_config.json (or its
      directory), config.data.image_processor.
    template: the training conversation template, 'phi35' | 'plain'
      (config.data.template), written as the chat template.
    text_target: 'phi3' | 'dense'; None: 'phi3' when tokenizer_dir's
      config.json is a Phi-3, else 'dense' (Llama / Qwen2 / Qwen3 by the
      attention).
    max_shard_bytes: the most tensor bytes per safetensors shard.
    progress: show a progress bar.

  Returns:
    out_dir.

  Raises:
    ValueError: what the stock class cannot hold (module docstring), or a
      tokenizer whose '<image>' is not the model's image token (named with
      the fix); FileExistsError: out_dir exists.
  """
  if text_target is None:
    text_target = text_target_of(tokenizer_dir)
  check_exportable(llava_kwargs, text_target)
  require(template in CHAT_TEMPLATES, 'template',
          f'one of {tuple(CHAT_TEMPLATES)}', template)
  if os.path.exists(out_dir):
    raise FileExistsError(f'{out_dir} exists; export writes a new directory')
  check_image_token(tokenizer_dir, int(llava_kwargs['image_token_id']))
  parent = os.path.dirname(os.path.abspath(out_dir))
  os.makedirs(parent, exist_ok=True)
  staging = tempfile.mkdtemp(dir=parent, prefix='.export-llava-')
  try:
    config = hf_llava_config(llava_kwargs, text_target,
                             _base_config(tokenizer_dir))
    vision_families.write_json(os.path.join(staging, 'config.json'), config)
    text = config['text_config']
    generation = {k: text[k] for k in ('bos_token_id', 'eos_token_id',
                                       'pad_token_id')
                  if text.get(k) is not None}
    vision_families.write_json(
        os.path.join(staging, 'generation_config.json'),
        {'_from_model_config': True, **generation})
    writer = safetensors_io.ShardedWriter(staging,
                                          max_shard_bytes=max_shard_bytes)
    with writer:
      for key, array in tqdm(llava_tensors(llava_kwargs, params,
                                           text_target),
                             desc='export', unit='tensor',
                             disable=not progress):
        writer.add(key, array)
    _copy_tokenizer(tokenizer_dir, staging)
    _write_processor_files(staging, llava_kwargs, image_processor_config,
                           template)
    os.replace(staging, out_dir)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
  return out_dir
