"""Loading and validating experiment configs (style.md §3).

A config file is `configs/<name>.py::get_config(arg=None)` returning an
`ml_collections.ConfigDict`; what the LibMoE LM experiment puts in it lives
in moe_jax/lm_experiment.py and moe_jax/router_recipes.py. This module holds
what every experiment shares: `parse_arg` for big_vision-style arguments
(`file.py:tiny,key=value`), `validate` (once at start-up, errors naming the
field), and `load_config` for scripts and notebooks.
"""

from __future__ import annotations

import math
import re
from typing import Any

import ml_collections

from moe_jax import models
from moe_jax.moe import activations
from moe_jax.moe import backend_probe
from moe_jax.moe import layer as layer_lib
from moe_jax.moe import losses as losses_lib
from moe_jax.moe import router as router_lib
from moe_jax.validation import require

ConfigDict = ml_collections.ConfigDict

DTYPES = ('float32', 'bfloat16', 'float16')
DATA_SOURCES = ('files', 'array_record', 'tfds', 'synthetic', 'llava')
LAYER_REDUCTIONS = ('sum', 'mean')
VISION_KINDS = ('siglip', 'clip')
VLM_FFNS = ('dense', 'moe')
SCHEDULES = ('cosine', 'constant')
MESH_AXES = ('data', 'fsdp', 'expert', 'tensor')


# ----------------------------------------------------------------------------
# Arguments.

def _parse_value(key: str, text: str, default: Any) -> Any:
  """Converts `text` to the type of `default` (bool, int, float or str)."""
  if isinstance(default, bool):
    low = text.lower()
    if low in ('true', '1', 'yes', ''):
      return True
    if low in ('false', '0', 'no'):
      return False
    raise ValueError(f'config arg {key}: expected a bool, got {text!r}')
  try:
    if isinstance(default, int):
      return int(text)
    if isinstance(default, float):
      return float(text)
  except ValueError:
    raise ValueError(f'config arg {key}: expected {type(default).__name__}, '
                     f'got {text!r}') from None
  return text


def parse_arg(arg: str | None, **spec: Any) -> ConfigDict:
  """Parses a big_vision config argument: 'tiny' or 'key=value,key2=value2'.

  A bare word sets a bool key to True ('tiny' == 'tiny=True'). Values take the
  type of their default in `spec`. Unknown keys raise a ValueError naming them.

  Args:
    arg: the text after ':' in `--config=configs/file.py:arg`, or None.
    **spec: the accepted keys and their defaults.

  Returns:
    A ConfigDict with every key of `spec`.
  """
  args = dict(spec)
  for item in (arg or '').split(','):
    item = item.strip()
    if not item:
      continue
    key, _, text = item.partition('=')
    key = key.strip()
    if key not in spec:
      raise ValueError(f'config arg {key}: unknown; expected one of '
                       f'{sorted(spec)}')
    if '=' not in item and not isinstance(spec[key], bool):
      raise ValueError(f'config arg {key}: needs a value ({key}=...)')
    args[key] = _parse_value(key, text.strip(), spec[key])
  return ConfigDict(args)


# ----------------------------------------------------------------------------
# Validation.

def _validate_moe(config: ConfigDict, d_model: int) -> None:
  """config.moe of MoE layers of width `d_model`."""
  moe = config.moe
  require(moe.router in router_lib.ROUTERS, 'moe.router',
          f'one of {sorted(router_lib.ROUTERS)}', moe.router)
  require(moe.backend in backend_probe.CHOICES, 'moe.backend',
          f'one of {list(backend_probe.CHOICES)}', moe.backend)
  require(isinstance(moe.num_experts, int) and moe.num_experts >= 1,
          'moe.num_experts', 'an integer >= 1', moe.num_experts)
  require(isinstance(moe.top_k, int) and 1 <= moe.top_k <= moe.num_experts,
          'moe.top_k', f'an integer in [1, moe.num_experts={moe.num_experts}]',
          moe.top_k)
  require(moe.d_model == d_model, 'moe.d_model', f'the layers\' width {d_model}',
          moe.d_model)
  losses = tuple(moe.losses)
  bad = [n for n in losses if n not in losses_lib.LOSSES]
  require(not bad, 'moe.losses', f'names among {losses_lib.LOSSES}', bad)
  coefficients = dict(config.loss.coefficients)
  require(set(coefficients) == set(losses), 'loss.coefficients',
          f'exactly one coefficient per name of moe.losses {losses}',
          sorted(coefficients))
  # RouterConfig checks (option names, choices, ranges, top_k vs router width).
  options = config.moe.router_options.to_dict()
  try:
    router_lib.make_config(moe.router, num_experts=moe.num_experts,
                           top_k=moe.top_k, d_model=moe.d_model, **options)
  except ValueError as e:
    raise ValueError(f'moe.router_options.{e}') from None
  except TypeError as e:
    raise ValueError(f'moe.router_options: {e}') from None
  # MoEBlock's own field checks (shared mix, count mode, stds, ...).
  kwargs = {k: v for k, v in config.moe.to_dict().items()}
  try:
    layer_lib.MoEBlock(**kwargs)._validate()
  except ValueError as e:
    raise ValueError(f'moe.{e}') from None
  hook = router_lib.ROUTERS[moe.router].step_hook
  if hook is not None:
    key = hook.options_key
    require(key in config.loss, f'loss.{key}',
            f'the step-hook settings of router {moe.router}', None)
    try:
      hook.check(config.loss[key].to_dict())
    except ValueError as e:
      raise ValueError(f'loss.{key}.{e}') from None
  mesh = config.mesh
  if mesh.expert > 1:
    require(moe.num_experts % mesh.expert == 0, 'mesh.expert',
            f'a divisor of moe.num_experts={moe.num_experts}', mesh.expert)


def _validate_dense(config: ConfigDict) -> None:
  model, dense = config.model, config.dense
  require(dense.d_model == model.d_model, 'dense.d_model',
          f'model.d_model={model.d_model}', dense.d_model)
  require(dense.width >= 1, 'dense.width', 'an integer >= 1', dense.width)
  require(dense.activation in activations.ACTIVATIONS, 'dense.activation',
          f'one of {activations.ACTIVATIONS}', dense.activation)


def _validate_vlm(config: ConfigDict) -> None:
  """The VLM parts (moe_jax/vlm_experiment.py): LLM MLP, tower, vlm, moe."""
  require(config.model.dense_ffn, 'model.dense_ffn',
          "True (the VLM's LLM stays dense)", config.model.dense_ffn)
  _validate_dense(config)
  vision, vlm = config.vision, config.vlm
  require(vision.kind in VISION_KINDS, 'vision.kind', f'one of {VISION_KINDS}',
          vision.kind)
  for name in ('image_size', 'patch_size', 'd_model', 'num_layers',
               'num_heads', 'mlp_width'):
    require(isinstance(vision[name], int) and vision[name] >= 1,
            f'vision.{name}', 'an integer >= 1', vision[name])
  require(vision.image_size % vision.patch_size == 0, 'vision.image_size',
          f'a multiple of vision.patch_size={vision.patch_size}',
          vision.image_size)
  require(vision.activation in activations.ACTIVATIONS, 'vision.activation',
          f'one of {activations.ACTIVATIONS}', vision.activation)
  for name in ('tower_ffn', 'projector_ffn'):
    require(vlm[name] in VLM_FFNS, f'vlm.{name}', f'one of {VLM_FFNS}',
            vlm[name])
  scales = tuple(vlm.s2_scales)
  require(bool(scales) and scales[0] == 1 and
          all(isinstance(s, int) and s >= 1 for s in scales), 'vlm.s2_scales',
          'integers starting with 1 (LibMoE: (1, 3))', scales)
  require(isinstance(vlm.image_token_id, int) and vlm.image_token_id >= 0,
          'vlm.image_token_id', 'an integer >= 0', vlm.image_token_id)
  train = config.train
  for name in ('trace_every', 'eval_tasks_every'):
    require(not train[name], f'train.{name}',
            '0 for a VLM (text-only routing traces and zero-shot tasks)',
            train[name])
  if 'moe' in (vlm.tower_ffn, vlm.projector_ffn):
    _validate_moe(config, vision.d_model)
    hook = router_lib.ROUTERS[config.moe.router].step_hook
    require(hook is None, 'moe.router',
            'a router without a step hook in a VLM', config.moe.router)
  else:
    require(not dict(config.loss.coefficients), 'loss.coefficients',
            "none when vlm.tower_ffn and vlm.projector_ffn are 'dense'",
            dict(config.loss.coefficients))


def _validate_layer_loop(config: ConfigDict) -> None:
  """train.layer_loop='scan': the decoder only, and nothing that reads
  layer_{i} parameters (HF import and upcycling)."""
  loop = config.train.layer_loop
  require(loop in ('unrolled', 'scan'), 'train.layer_loop',
          "one of ('unrolled', 'scan')", loop)
  require(config.model_name == 'decoder', 'train.layer_loop',
          f"'unrolled' for model_name={config.model_name!r} (scan is the "
          'decoder only)', loop)
  require(not config.init.hf_path, 'train.layer_loop',
          "'unrolled' with init.hf_path (HF import / upcycling read "
          'layer_{i} parameters)', loop)


def validate(config: ConfigDict, num_devices: int | None = None) -> None:
  """Checks a config once at start-up; raises ValueError naming the field.

  Args:
    config: a config from `base_config` (or a config file).
    num_devices: if given, the device count the mesh must fit.
  """
  model, train, data = config.model, config.train, config.data
  mesh = config.mesh
  require(config.model_name in models.MODELS, 'model_name',
          f'one of {sorted(models.MODELS)}', config.model_name)
  for name in ('vocab_size', 'd_model', 'num_layers', 'num_heads',
               'head_dim'):
    value = model[name]
    require(isinstance(value, int) and value >= 1, f'model.{name}',
            'an integer >= 1', value)
  require(model.vocab_size == data.vocab_size, 'model.vocab_size',
          f'data.vocab_size={data.vocab_size}', model.vocab_size)
  if mesh.tensor > 1:
    require(model.num_heads % mesh.tensor == 0, 'model.num_heads',
            f'a multiple of mesh.tensor={mesh.tensor}', model.num_heads)

  # Losses.
  for name, value in config.loss.coefficients.items():
    require(isinstance(value, (int, float)) and value >= 0,
            f'loss.coefficients.{name}', 'a number >= 0', value)
  require(config.loss.layer_reduction in LAYER_REDUCTIONS,
          'loss.layer_reduction', f'one of {LAYER_REDUCTIONS}',
          config.loss.layer_reduction)

  # FFN.
  if config.model_name == 'llava':
    _validate_vlm(config)
  elif model.dense_ffn:
    require('dense' in config, 'dense', 'a sub-dict when model.dense_ffn',
            None)
    _validate_dense(config)
    require(not dict(config.loss.coefficients), 'loss.coefficients',
            'none for the dense baseline', dict(config.loss.coefficients))
  else:
    require('moe' in config, 'moe', 'a sub-dict unless model.dense_ffn', None)
    _validate_moe(config, model.d_model)

  # Training.
  require(train.steps >= 1, 'train.steps', 'an integer >= 1', train.steps)
  require(train.learning_rate > 0, 'train.learning_rate', 'a value > 0',
          train.learning_rate)
  require(train.schedule in SCHEDULES, 'train.schedule', f'one of {SCHEDULES}',
          train.schedule)
  require(0 <= train.warmup_steps < train.steps, 'train.warmup_steps',
          f'in [0, train.steps={train.steps})', train.warmup_steps)
  require(train.cosine_steps >= 1, 'train.cosine_steps', 'an integer >= 1',
          train.cosine_steps)
  require(0 <= train.min_lr_ratio <= 1, 'train.min_lr_ratio', 'in [0, 1]',
          train.min_lr_ratio)
  for name in ('b1', 'b2'):
    require(0 <= train[name] < 1, f'train.{name}', 'in [0, 1)', train[name])
  require(train.eps > 0, 'train.eps', 'a value > 0', train.eps)
  require(train.weight_decay >= 0, 'train.weight_decay', 'a value >= 0',
          train.weight_decay)
  require(train.grad_clip > 0, 'train.grad_clip', 'a value > 0',
          train.grad_clip)
  require(train.grad_accum >= 1, 'train.grad_accum', 'an integer >= 1',
          train.grad_accum)
  require(train.global_batch % train.grad_accum == 0, 'train.global_batch',
          f'a multiple of train.grad_accum={train.grad_accum}',
          train.global_batch)
  require(train.seq_len >= 1, 'train.seq_len', 'an integer >= 1',
          train.seq_len)
  require(train.dtype in DTYPES, 'train.dtype', f'one of {DTYPES}',
          train.dtype)
  if train.get('layer_loop', 'unrolled') != 'unrolled':
    _validate_layer_loop(config)
  require(0 <= train.halt_at_step <= train.steps, 'train.halt_at_step',
          f'in [0, train.steps={train.steps}]', train.halt_at_step)
  for name in ('log_every', 'eval_every', 'eval_batches', 'checkpoint_every',
               'keep'):
    require(train[name] >= 1, f'train.{name}', 'an integer >= 1', train[name])
  require(train.trace_every >= 0, 'train.trace_every',
          'an integer >= 0 (0: no traces during training)', train.trace_every)
  require(not (train.trace_every and model.dense_ffn), 'train.trace_every',
          '0 for the dense baseline (model.dense_ffn: nothing is routed)',
          train.trace_every)

  require(len(train.trainable) >= 1, 'train.trainable',
          "regexes over parameter paths (('.*',): everything)",
          train.trainable)
  for pattern in train.trainable:
    try:
      re.compile(pattern)
    except re.error as e:
      raise ValueError(f'train.trainable: {pattern!r} is not a regex ({e})'
                       ) from None

  # Initialisation.
  upcycle = config.init.upcycle
  if upcycle.get('router'):
    require(bool(config.init.hf_path), 'init.upcycle.router',
            "'' unless init.hf_path names a dense model to upcycle",
            upcycle.router)
    require(upcycle.router in router_lib.ROUTERS, 'init.upcycle.router',
            f'one of {sorted(router_lib.ROUTERS)}', upcycle.router)

  # Data.
  require(data.source in DATA_SOURCES, 'data.source', f'one of {DATA_SOURCES}',
          data.source)
  require(data.seq_len == train.seq_len, 'data.seq_len',
          f'train.seq_len={train.seq_len}', data.seq_len)
  max_tokens = data.get('max_tokens')
  require(max_tokens is None or (isinstance(max_tokens, int) and
                                 max_tokens >= 0), 'data.max_tokens',
          'None or an integer >= 0 (None, 0: the whole source)', max_tokens)
  shard_seed = data.get('shard_seed')
  require(shard_seed is None or (isinstance(shard_seed, int) and
                                 not isinstance(shard_seed, bool) and
                                 shard_seed >= 0), 'data.shard_seed',
          'None (sorted shard order) or an integer >= 0 (LibMoE: 123)',
          shard_seed)
  if data.source in ('files', 'array_record'):
    require(bool(data.train_path), 'data.train_path',
            f'a path for data.source={data.source!r}', data.train_path)
  if data.source == 'tfds':
    require(bool(data.tfds_name), 'data.tfds_name',
            "a dataset name for data.source='tfds'", data.tfds_name)

  # Mesh.
  sizes = {a: mesh[a] for a in MESH_AXES}
  for axis, size in sizes.items():
    require(isinstance(size, int) and (size >= 1 or size == -1), f'mesh.{axis}',
            'an integer >= 1, or -1 (all remaining devices)', size)
  require(sum(s == -1 for s in sizes.values()) <= 1, 'mesh',
          'at most one axis of size -1', sizes)
  fixed = math.prod(s for s in sizes.values() if s != -1)
  if num_devices is not None:
    if -1 in sizes.values():
      require(num_devices % fixed == 0, 'mesh',
              f'fixed axis sizes dividing the {num_devices} devices', sizes)
    else:
      require(fixed == num_devices, 'mesh',
              f'axis sizes multiplying to the {num_devices} devices', sizes)
    data_ways = (num_devices // fixed if -1 in sizes.values() else 1)
    batch_ways = math.prod(
        data_ways if s == -1 else s
        for a, s in sizes.items() if a in ('data', 'fsdp', 'expert'))
    micro = train.global_batch // train.grad_accum
    require(micro % batch_ways == 0, 'train.global_batch',
            f'micro-batches (global_batch / grad_accum = {micro}) divisible '
            f'by the {batch_ways} batch shards of the mesh', train.global_batch)


def load_config(spec: str) -> ConfigDict:
  """`path/to/file.py[:arg]` -> that file's get_config(arg), as the flag does.

  For scripts and notebooks outside `main.py` (which uses config flags).
  """
  import importlib.util  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  path, _, arg = spec.partition(':')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'config file {path!r} does not exist (expected '
                            'configs/<router>_<size>.py[:arg])')
  name = os.path.splitext(os.path.basename(path))[0]
  module_spec = importlib.util.spec_from_file_location(f'configs.{name}', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)
