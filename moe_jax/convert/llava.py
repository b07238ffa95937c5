"""Importing a transformers LlavaForConditionalGeneration directory (no torch).

    kwargs, params = import_llava(hf_dir)
    logits, _ = Llava(**kwargs).apply({'params': params}, tokens, images)

The directory's config.json (read with transformers' AutoConfig, which
fills the defaults a nested config may omit) gives the vision tower
(SigLIP / CLIP, convert/vision_families.py), the LLM (a dense family of
convert/families.py: Phi-3, Llama, Mistral, Qwen2, Qwen3, by text_config's
model_type), the projector (mlp2x_gelu: linear_1 D_v -> W, erf GELU,
linear_2 W -> W) and the LLaVA fields: image_token_id (config.json
'image_token_index'), vision_feature_layer (one int) and
vision_feature_select_strategy ('default' drops the first feature row,
which is CLIP's class token; 'full' keeps all).

Key layouts (all read; the LLM's family keys 'model.X' gain the prefix):

  on disk (transformers 5 save_pretrained, and llava-hf hub checkpoints):
    language_model.model.X, language_model.lm_head.weight,
    multi_modal_projector.linear_{1,2}.{weight,bias}, vision_tower.[vision_model.]*
  in memory (transformers 5 module names, if a file carries them):
    model.language_model.X, lm_head.weight,
    model.multi_modal_projector.linear_{1,2}.*, model.vision_tower.*

Keys and shapes are checked against the tables before any tensor is read;
errors name the key, the expected shape and the file.

Dimension legend: D_v tower width, W LLM width (= projector width), V
vocabulary.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from moe_jax.convert import families
from moe_jax.convert import hf_import
from moe_jax.convert import safetensors_io
from moe_jax.convert import vision_families
from moe_jax.models import vision
from moe_jax.validation import require

# text_config.model_type -> families.py family.
TEXT_FAMILIES = {'llama': 'llama', 'mistral': 'llama', 'qwen2': 'qwen2',
                 'qwen3': 'qwen3', 'phi3': 'phi3'}
# Layout name -> (LLM prefix replacing 'model.', lm_head key, projector
# prefix); the embedding key tells them apart.
LAYOUTS = {
    'saved': ('language_model.model.', 'language_model.lm_head.weight',
              'multi_modal_projector.'),
    'memory': ('model.language_model.', 'lm_head.weight',
               'model.multi_modal_projector.'),
}
FEATURE_SELECTS = ('default', 'full')


def _layout(keys, source: str) -> str:
  for name, (llm, _, _) in LAYOUTS.items():
    if llm + 'embed_tokens.weight' in keys:
      return name
  raise ValueError(
      f'{source}: no LLaVA language-model embedding (expected '
      f"{' or '.join(l + 'embed_tokens.weight' for l, _, _ in LAYOUTS.values())})")


def _prefixed(table: list[families.Entry], llm_prefix: str, lm_head: str
              ) -> list[families.Entry]:
  """A families.py table with the LLM's keys under `llm_prefix`."""
  def rename(key: str) -> str:
    if key == 'lm_head.weight':
      return lm_head
    require(key.startswith('model.'), 'key table', "keys under 'model.'",
            key)
    return llm_prefix + key[len('model.'):]
  return [families.Entry(tuple(rename(k) for k in e.hf_keys), e.path,
                         e.shapes, e.to_jax) for e in table]


def _projector_table(prefix: str, d_in: int, width: int, bias: bool
                     ) -> list[families.Entry]:
  """linear_1 [W, D_v] -> ffn/ffn/w_in [D_v, W], linear_2 -> w_out [W, W]."""
  t = lambda a: np.ascontiguousarray(a.T)
  ident = lambda a: a
  path = ('projector', 'ffn', 'ffn')
  table = [families.entry(prefix + 'linear_1.weight', path + ('w_in',),
                          (width, d_in), t),
           families.entry(prefix + 'linear_2.weight', path + ('w_out',),
                          (width, width), t)]
  if bias:
    table += [families.entry(prefix + 'linear_1.bias', path + ('b_in',),
                             (width,), ident),
              families.entry(prefix + 'linear_2.bias', path + ('b_out',),
                             (width,), ident)]
  return table


def _feature_select(kind: str, strategy: str, source: str) -> str:
  """HF vision_feature_select_strategy -> VisionTower.feature_select."""
  require(strategy in FEATURE_SELECTS,
          f'{source}: vision_feature_select_strategy',
          f'one of {FEATURE_SELECTS}', strategy)
  if kind == 'clip':
    return 'patch' if strategy == 'default' else 'full'
  # SigLIP has no class token: 'default' would drop a real patch.
  require(strategy == 'full', f'{source}: vision_feature_select_strategy',
          "'full' for a SigLIP tower (it has no class token; 'default' "
          'drops the first patch, which VisionTower does not implement)',
          strategy)
  return 'patch'


def read_llava_config(hf_dir: str) -> Any:
  """transformers' LlavaConfig of `hf_dir` (defaults filled; no torch)."""
  import transformers  # pylint: disable=g-import-not-at-top
  hf = hf_import.read_hf_config(hf_dir)
  source = os.path.join(hf_dir, 'config.json')
  require(hf.get('model_type') == 'llava', f'{source}: model_type',
          "'llava' (LlavaForConditionalGeneration)", hf.get('model_type'))
  return transformers.AutoConfig.from_pretrained(hf_dir,
                                                 local_files_only=True)


def llava_kwargs(config: Any, source: str) -> dict[str, Any]:
  """Llava keyword arguments (models/llava.py), dense tower and projector."""
  text = config.text_config.to_dict()
  family = TEXT_FAMILIES.get(text.get('model_type'))
  require(family is not None, f'{source}: text_config.model_type',
          f'one of {tuple(TEXT_FAMILIES)}', text.get('model_type'))
  tower = vision.tower_kwargs_from_hf(config.vision_config.to_dict())
  layer = config.vision_feature_layer
  require(isinstance(layer, int), f'{source}: vision_feature_layer',
          'one int (several concatenated layers are not implemented)', layer)
  tower.update(feature_layer=int(layer), feature_select=_feature_select(
      tower['kind'], config.vision_feature_select_strategy, source))
  require(config.projector_hidden_act == 'gelu',
          f'{source}: projector_hidden_act', "'gelu' (mlp2x_gelu)",
          config.projector_hidden_act)
  llm = families.model_kwargs(text, family)
  return dict(tower=tower, llm=llm, projector_width=llm['d_model'],
              image_token_id=int(config.image_token_id), tower_ffn='dense',
              projector_ffn='dense', s2_scales=(1,))


def import_llava(hf_dir: str, *, progress: bool = False
                 ) -> tuple[dict[str, Any], dict]:
  """(Llava kwargs, float32 params) of a LlavaForConditionalGeneration dir.

  Raises:
    ValueError: a config field moe_jax does not implement (named), or
      missing, unexpected or mis-shaped keys (named with the file).
  """
  source = os.path.join(hf_dir, 'config.json')
  config = read_llava_config(hf_dir)
  kwargs = llava_kwargs(config, source)
  text = config.text_config.to_dict()
  family = TEXT_FAMILIES[text['model_type']]
  checkpoint = safetensors_io.ShardedCheckpoint(hf_dir)
  keys = set(checkpoint.keys())
  llm_prefix, lm_head, projector_prefix = LAYOUTS[_layout(keys, hf_dir)]
  llm_table = _prefixed(families.key_table(text, family), llm_prefix,
                        lm_head)
  d_in, width = kwargs['tower']['d_model'], kwargs['projector_width']
  bias = bool(getattr(config, 'multimodal_projector_bias', True))
  projector_table = _projector_table(projector_prefix, d_in, width, bias)
  vision_prefix = vision_families.detect_prefix(keys, hf_dir)
  tied = kwargs['llm']['tie_embeddings']
  hf_import.check_keys(
      checkpoint, llm_table + projector_table, tied=tied,
      ignore=lambda k: k.startswith(vision_prefix) or (tied and k == lm_head))
  _, tower_params = vision_families.import_tower(
      checkpoint, vision_prefix, vision_config=config.vision_config.to_dict())
  llm_params = hf_import.read_params(checkpoint, llm_table, progress=progress)
  params = hf_import.read_params(checkpoint, projector_table, progress=False)
  if not bias:
    # The projector here always has biases: zeros compute the same.
    ffn = params['projector']['ffn']['ffn']
    ffn['b_in'] = np.zeros((width,), np.float32)
    ffn['b_out'] = np.zeros((width,), np.float32)
  params['vision'] = tower_params
  params['llm'] = llm_params
  return kwargs, params
