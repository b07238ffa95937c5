"""SigLIP / CLIP vision towers <-> Hugging Face checkpoints (no torch).

    kwargs, params = import_tower(hf_dir)            # prefix auto-detected
    features, _ = VisionTower(**kwargs).apply({'params': params}, pixels)
    export_tower(out_dir, kwargs, params)            # SiglipVisionModel dir
    write_tiny_tower(out_dir, kind='clip')           # tiny random HF tower

Key table (`key_table(kwargs, prefix)`; flax paths as models/vision.py):

  {p}embeddings.patch_embedding.weight [D, C, P, P]   embeddings/patch/kernel
                                                      [P, P, C, D]
  {p}embeddings.patch_embedding.bias [D]              embeddings/patch/bias
                                                      (SigLIP)
  {p}embeddings.position_embedding.weight [N(+1), D]  embeddings/position
  {p}embeddings.class_embedding [D]                   embeddings/class_token
                                                      (CLIP)
  {p}pre_layrnorm.{weight, bias}                      pre_ln/{scale, bias}
                                                      (CLIP)
  {p}encoder.layers.{i}.layer_norm{1,2}.{weight,bias} layer_{i}/ln{1,2}
  {p}encoder.layers.{i}.self_attn.{q,k,v,out}_proj.{weight,bias}
                                        layer_{i}/attention/{query,key,value,
                                        out}/{kernel (transposed), bias}
  {p}encoder.layers.{i}.mlp.fc1.{weight,bias}         layer_{i}/ffn/ffn/
                                                      {w_in (T), b_in}
  {p}encoder.layers.{i}.mlp.fc2.{weight,bias}         .../{w_out (T), b_out}
  {p}post_layernorm.{weight, bias}                    post_ln/{scale, bias}

The prefix p depends on who wrote the file: '' for SiglipVisionModel /
CLIPVisionModel saved by transformers 5; 'vision_model.' for hub towers and
full SiglipModel / CLIPModel checkpoints (transformers 4 layout, which
transformers 5 still loads); 'vision_tower.' for LlavaForConditionalGeneration
saved by transformers 5 (its in-memory name is 'model.vision_tower.', but
save_pretrained writes the legacy 'vision_tower.'); 'vision_tower.vision_model.'
for llava-hf hub checkpoints. `prefix=None` finds it from the unique key
ending in 'embeddings.patch_embedding.weight'. Keys outside the prefix (a
LLaVA's LLM and projector), SigLIP's pooling head ('{p}head.*') and
position_ids buffers are ignored.

Export writes 'vision_model.'-prefixed keys (loadable by transformers 4 and
5), config.json (model_type siglip_vision_model / clip_vision_model, SigLIP
without its pooling head) and preprocessor_config.json as transformers'
SiglipImageProcessor / CLIPImageProcessor saves it, each file atomically.

Dimension legend: as models/vision.py (C channels, P patch, N patches,
D width, F MLP width, L layers).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from typing import Any, Iterator, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from moe_jax.convert import families
from moe_jax.convert import hf_import
from moe_jax.convert import safetensors_io
from moe_jax.convert import tiny
from moe_jax.models import vision
from moe_jax.validation import require

Entry = families.Entry
entry = families.entry
PATCH_SUFFIX = 'embeddings.patch_embedding.weight'
EXPORT_PREFIX = 'vision_model.'
# kind -> (model_type, architecture) of config.json.
ARCHITECTURES = {'siglip': ('siglip_vision_model', 'SiglipVisionModel'),
                 'clip': ('clip_vision_model', 'CLIPVisionModel')}
# moe_jax activation -> HF hidden_act.
HF_ACTS = {'gelu_tanh': 'gelu_pytorch_tanh', 'quick_gelu': 'quick_gelu',
           'gelu': 'gelu'}
# preprocessor_config.json as transformers 5.24 saves SiglipImageProcessor /
# CLIPImageProcessor (resample 3 = bicubic; SigLIP squashes to
# image_size x image_size, CLIP resizes the shortest edge then centre-crops).
_IMAGE_MEANS = {'siglip': ([0.5, 0.5, 0.5], [0.5, 0.5, 0.5]),
                'clip': ([0.48145466, 0.4578275, 0.40821073],
                         [0.26862954, 0.26130258, 0.27577711])}


def _t(a: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(a.T)


def _identity(a: np.ndarray) -> np.ndarray:
  return a


def _conv(a: np.ndarray) -> np.ndarray:
  """torch Conv2d [D, C, P, P] -> flax Conv [P, P, C, D]."""
  return np.ascontiguousarray(a.transpose(2, 3, 1, 0))


def key_table(kwargs: Mapping[str, Any], prefix: str = EXPORT_PREFIX
              ) -> list[Entry]:
  """Every tensor of a dense SigLIP / CLIP tower checkpoint and its path.

  Args:
    kwargs: VisionTower kwargs (tower_kwargs_from_hf of the config).
    prefix: the checkpoint's key prefix (see the module docstring).
  """
  kind, p = kwargs['kind'], prefix
  d, f, c = kwargs['d_model'], kwargs['mlp_width'], kwargs.get(
      'num_channels', 3)
  patch = kwargs['patch_size']
  n = (kwargs['image_size'] // patch) ** 2 + int(kind == 'clip')
  emb = ('embeddings',)
  out = [entry(p + PATCH_SUFFIX, emb + ('patch', 'kernel'),
               (d, c, patch, patch), _conv),
         entry(p + 'embeddings.position_embedding.weight',
               emb + ('position',), (n, d), _identity)]
  if kind == 'clip':
    out.append(entry(p + 'embeddings.class_embedding', emb + ('class_token',),
                     (d,), _identity))
  else:
    out.append(entry(p + 'embeddings.patch_embedding.bias',
                     emb + ('patch', 'bias'), (d,), _identity))

  def norm(hf_name, path):
    return [entry(p + hf_name + '.weight', path + ('scale',), (d,),
                  _identity),
            entry(p + hf_name + '.bias', path + ('bias',), (d,), _identity)]

  def linear(hf_name, path, kernel, bias, d_out, d_in):
    """torch Linear (out, in) weight -> flax (in, out) kernel, and bias."""
    return [entry(p + hf_name + '.weight', path + (kernel,), (d_out, d_in),
                  _t),
            entry(p + hf_name + '.bias', path + (bias,), (d_out,),
                  _identity)]

  if kind == 'clip':
    out += norm('pre_layrnorm', ('pre_ln',))
  for i in range(kwargs['num_layers']):
    pre, layer = f'encoder.layers.{i}.', f'layer_{i}'
    out += norm(pre + 'layer_norm1', (layer, 'ln1'))
    out += norm(pre + 'layer_norm2', (layer, 'ln2'))
    for hf_name, name in (('q', 'query'), ('k', 'key'), ('v', 'value'),
                          ('out', 'out')):
      out += linear(pre + f'self_attn.{hf_name}_proj',
                    (layer, 'attention', name), 'kernel', 'bias', d, d)
    ffn = (layer, 'ffn', 'ffn')
    out += linear(pre + 'mlp.fc1', ffn, 'w_in', 'b_in', f, d)
    out += linear(pre + 'mlp.fc2', ffn, 'w_out', 'b_out', d, f)
  out += norm('post_layernorm', ('post_ln',))
  return out


def detect_prefix(keys, source: str) -> str:
  """The prefix of the one key ending in 'embeddings.patch_embedding.weight'.

  Args:
    keys: the checkpoint's keys.
    source: where they come from (the checkpoint directory), for the error.
  """
  found = sorted(k[:-len(PATCH_SUFFIX)] for k in keys
                 if k.endswith(PATCH_SUFFIX))
  if len(found) != 1:
    raise ValueError(
        f'{source}: cannot tell the vision tower\'s key prefix: '
        f'{len(found)} keys end in {PATCH_SUFFIX!r} ({found[:4]}); pass '
        'prefix=')
  return found[0]


def _ignore(prefix: str):
  """Checkpoint keys that hold no tower parameter."""
  def ignore(key: str) -> bool:
    return (not key.startswith(prefix) or
            key.startswith(prefix + 'head.') or
            key.endswith('position_ids'))
  return ignore


def _vision_config(checkpoint_dir: str) -> dict[str, Any]:
  """The tower's config dict of a directory: config.json itself, or its
  'vision_config' (LLaVA, SiglipModel, CLIPModel)."""
  hf = hf_import.read_hf_config(checkpoint_dir)
  if hf.get('model_type') in vision.MODEL_TYPES:
    return hf
  if isinstance(hf.get('vision_config'), dict):
    return hf['vision_config']
  raise ValueError(
      f'{os.path.join(checkpoint_dir, "config.json")}: model_type '
      f'{hf.get("model_type")!r} is not a vision tower '
      f'({tuple(vision.MODEL_TYPES)}) and has no vision_config')


def check_params(kwargs: Mapping[str, Any], params: Mapping) -> None:
  """params has exactly VisionTower(**kwargs)'s names and shapes."""
  tower = vision.VisionTower(**kwargs)
  size = kwargs['image_size']
  pixels = jnp.zeros((1, size, size, kwargs.get('num_channels', 3)))
  want = nn.unbox(jax.eval_shape(
      lambda: tower.init(jax.random.key(0), pixels)))['params']
  flat = lambda t: {jax.tree_util.keystr(p): tuple(a.shape) for p, a in
                    jax.tree_util.tree_flatten_with_path(t)[0]}
  want, got = flat(want), flat(params)
  if want != got:
    diff = sorted(set(want.items()) ^ set(got.items()))[:8]
    raise ValueError(f'vision tower parameters do not match VisionTower('
                     f'kind={kwargs["kind"]!r}): differing (path, shape): '
                     f'{diff}')


def import_tower(hf_dir_or_checkpoint, prefix: str | None = None, *,
                 vision_config: Mapping[str, Any] | None = None
                 ) -> tuple[dict[str, Any], dict]:
  """(VisionTower kwargs, float32 params) of an HF SigLIP / CLIP tower.

  Args:
    hf_dir_or_checkpoint: a directory (config.json + safetensors) or an open
      safetensors_io.ShardedCheckpoint (then its directory's config.json is
      read unless vision_config is given).
    prefix: the tower's key prefix; None detects it (module docstring).
    vision_config: the tower's HF config dict; None reads config.json (the
      file itself, or its 'vision_config').

  Returns:
    (kwargs, params): dense-tower kwargs (tower_kwargs_from_hf) and the
    parameter tree of VisionTower(**kwargs).

  Raises:
    ValueError: missing, unexpected or mis-shaped keys (named with the
      expected shape and the file), or an unknown config.
  """
  if isinstance(hf_dir_or_checkpoint, safetensors_io.ShardedCheckpoint):
    checkpoint = hf_dir_or_checkpoint
  else:
    checkpoint = safetensors_io.ShardedCheckpoint(hf_dir_or_checkpoint)
  if vision_config is None:
    vision_config = _vision_config(checkpoint.directory)
  kwargs = vision.tower_kwargs_from_hf(vision_config)
  if prefix is None:
    prefix = detect_prefix(checkpoint.keys(), checkpoint.directory)
  table = key_table(kwargs, prefix)
  hf_import.check_keys(checkpoint, table, tied=False, ignore=_ignore(prefix))
  params = hf_import.read_params(checkpoint, table, progress=False)
  check_params(kwargs, params)
  return kwargs, params


# ------------------------------------------------------------------ export ---

def hf_vision_config(kwargs: Mapping[str, Any]) -> dict[str, Any]:
  """config.json of a SiglipVisionModel / CLIPVisionModel of these kwargs."""
  kind = kwargs['kind']
  require(kind in ARCHITECTURES, 'kind', f'one of {tuple(ARCHITECTURES)}',
          kind)
  require(kwargs['activation'] in HF_ACTS, 'activation',
          f'one of {tuple(HF_ACTS)} (an HF vision hidden_act)',
          kwargs['activation'])
  model_type, arch = ARCHITECTURES[kind]
  config = dict(
      architectures=[arch], model_type=model_type,
      hidden_size=kwargs['d_model'], intermediate_size=kwargs['mlp_width'],
      num_hidden_layers=kwargs['num_layers'],
      num_attention_heads=kwargs['num_heads'],
      num_channels=kwargs.get('num_channels', 3),
      image_size=kwargs['image_size'], patch_size=kwargs['patch_size'],
      hidden_act=HF_ACTS[kwargs['activation']],
      layer_norm_eps=kwargs['norm_eps'], attention_dropout=0.0,
      dtype='float32')
  if kind == 'siglip':
    # No pooling head: LLaVA never uses it and the tower has none.
    config['vision_use_head'] = False
  else:
    config.update(initializer_factor=1.0, initializer_range=0.02,
                  projection_dim=512)
  return config


def preprocessor_config(kind: str, image_size: int) -> dict[str, Any]:
  """preprocessor_config.json of the tower's HF image processor."""
  mean, std = _IMAGE_MEANS[kind]
  common = dict(do_convert_rgb=True, do_normalize=True, do_rescale=True,
                do_resize=True, image_mean=mean, image_std=std, resample=3,
                rescale_factor=1 / 255)
  if kind == 'siglip':
    return dict(common, image_processor_type='SiglipImageProcessor',
                size={'height': image_size, 'width': image_size})
  return dict(common, image_processor_type='CLIPImageProcessor',
              do_center_crop=True,
              crop_size={'height': image_size, 'width': image_size},
              size={'shortest_edge': image_size})


def write_json(path: str, content: Mapping[str, Any]) -> None:
  """Writes JSON as transformers does (indented, sorted keys), atomically.

  Not run_log.write_text_atomic: its mkstemp file is mode 0600, and an
  exported checkpoint's files keep the umask's permissions, as
  safetensors_io writes its shards (readable by an evaluation running as
  another user).
  """
  tmp = os.path.join(os.path.dirname(path),
                     f'.{os.path.basename(path)}.{secrets.token_hex(6)}.tmp')
  try:
    with open(tmp, 'x', encoding='utf-8') as f:
      json.dump(content, f, indent=2, sort_keys=True)
      f.write('\n')
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def tower_tensors(kwargs: Mapping[str, Any], params: Mapping,
                  prefix: str = EXPORT_PREFIX
                  ) -> Iterator[tuple[str, np.ndarray]]:
  """Yields (HF key, torch-layout float32 array) of a dense tower, one
  tensor at a time (so an export streams them into its shards).

  Args:
    kwargs: dense VisionTower kwargs (no ffn / feature_* fields).
    params: VisionTower(**kwargs) parameters (checked against it first).
    prefix: the key prefix written (see the module docstring).

  Raises:
    ValueError: params do not match VisionTower(**kwargs) (named).
  """
  check_params(kwargs, params)
  for item in key_table(kwargs, prefix):
    value = np.asarray(hf_import.get_path(params, item.path), np.float32)
    if item.path[-2:] == ('patch', 'kernel'):
      value = value.transpose(3, 2, 0, 1)                    # [D, C, P, P]
    elif value.ndim == 2 and item.path[-1] != 'position':
      value = value.T                                        # torch (out, in)
    require(tuple(value.shape) == tuple(item.shapes[0]), item.hf_keys[0],
            f'shape {item.shapes[0]}', value.shape)
    yield item.hf_keys[0], np.ascontiguousarray(value)


def export_tower(out_dir: str, kwargs: Mapping[str, Any], params: Mapping, *,
                 prefix: str = EXPORT_PREFIX) -> str:
  """Writes a dense tower as an HF SiglipVisionModel / CLIPVisionModel dir.

  Args:
    out_dir: the directory (created; must not hold a checkpoint already).
    kwargs: VisionTower kwargs (dense_ffn; ffn / feature_* are ignored).
    params: VisionTower(**kwargs) parameters.
    prefix: key prefix written ('vision_model.' loads in transformers 4/5).

  Returns:
    out_dir, holding model.safetensors, config.json, preprocessor_config.json.
  """
  require(kwargs.get('dense_ffn', True), 'dense_ffn',
          'True (HF SigLIP / CLIP towers have dense MLPs; export the MoE '
          'tower through its own format)', kwargs.get('dense_ffn'))
  dense = {k: v for k, v in kwargs.items() if k not in ('ffn', 'dense_ffn')}
  tensors = dict(tower_tensors(dense, params, prefix))
  os.makedirs(out_dir, exist_ok=True)
  safetensors_io.write_safetensors(
      os.path.join(out_dir, safetensors_io.SINGLE_FILE), tensors)
  write_json(os.path.join(out_dir, 'config.json'), hf_vision_config(dense))
  write_json(os.path.join(out_dir, 'preprocessor_config.json'),
             preprocessor_config(dense['kind'], dense['image_size']))
  return out_dir


def random_params(kwargs: Mapping[str, Any], seed: int) -> dict:
  """Float32 VisionTower params: N(0, 0.02²), norm scales 1 + N(0, 0.02²),
  drawn in sorted path order (reproducible for a seed)."""
  tower = vision.VisionTower(**kwargs)
  size = kwargs['image_size']
  pixels = jnp.zeros((1, size, size, kwargs.get('num_channels', 3)))
  shapes = nn.unbox(jax.eval_shape(
      lambda: tower.init(jax.random.key(0), pixels)))['params']
  return tiny.draw_params(shapes, seed)


def write_tiny_tower(out_dir: str, kind: str = 'siglip', *, seed: int = 0,
                     image_size: int = 32, patch_size: int = 8,
                     d_model: int = 32, num_layers: int = 3,
                     num_heads: int = 4, mlp_width: int = 64) -> str:
  """Writes a tiny random HF SigLIP / CLIP tower directory (no torch).

  Loadable offline by transformers' SiglipVisionModel / CLIPVisionModel (and
  AutoImageProcessor), and by import_tower. Weights N(0, 0.02²), norm scales
  1 + N(0, 0.02²) (so a swapped norm shows in a round trip).

  Returns:
    out_dir.

  Raises:
    FileExistsError: out_dir exists.
  """
  require(kind in ARCHITECTURES, 'kind', f'one of {tuple(ARCHITECTURES)}',
          kind)
  if os.path.exists(out_dir):
    raise FileExistsError(f'{out_dir} exists; write_tiny_tower writes a new '
                          'directory')
  model_type = ARCHITECTURES[kind][0]
  kwargs = vision.tower_kwargs_from_hf(dict(
      model_type=model_type, image_size=image_size, patch_size=patch_size,
      hidden_size=d_model, num_hidden_layers=num_layers,
      num_attention_heads=num_heads, intermediate_size=mlp_width))
  params = random_params(kwargs, seed)
  # Written into a hidden sibling, then renamed: whole or not at all.
  parent = os.path.dirname(os.path.abspath(out_dir))
  os.makedirs(parent, exist_ok=True)
  tmp = os.path.join(parent, f'.{os.path.basename(out_dir)}.'
                     f'{secrets.token_hex(6)}.tmp')
  try:
    export_tower(tmp, kwargs, params)
    os.replace(tmp, out_dir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return out_dir
