"""Exporting any moe_jax decoder as a Hugging Face `trust_remote_code` package.

    export_remote_code(kwargs, params, router_state, out_dir=DIR)
    AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)

For the models no stock class holds (formats.md §5.1): the xmoe, cosine,
perturbed_cosine, hyper, tc_moe, moe_plus_plus and remoe routers, sigmoid
without renormalisation, and LibMoE's LM stack (LayerNorm, partial RoPE,
fused K/V, ReLU bias-free experts, an output bias); every other router and
decoder option too. The directory holds

  config.json                  model_type 'moe_jax', auto_map to the two
                               files below, `moe_jax_kwargs` (the
                               TransformerLM kwargs as plain JSON) and
                               `moe_jax_router` (every RouterConfig field,
                               resolved by router.make_config)
  configuration_moe_jax.py     copied verbatim from remote_code_files/:
  modeling_moe_jax.py          a PyTorch port of the eval forward that
                               imports only torch and transformers
  model.safetensors (+ index)  the flax parameters, keys = flax paths joined
                               with '.', kernels in flax (in, out) layout;
                               router_state leaves sit beside their router's
                               parameters ('layer_0.moe.router.router.bias')
  tokenizer files              when tokenizer_dir is given

Only the eval forward is ported (train=False: no noise, HyperRouter at
k_max, state read not updated) and only dropless layers (capacity_factor
None; a capacity is refused). No torch is needed here. The directory is
written whole or not at all (a temporary directory renamed at the end).

Dimension legend: L layers, E experts.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from typing import Any, Iterator, Mapping

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from moe_jax.convert import hf_export
from moe_jax.convert import safetensors_io
from moe_jax.moe import router as router_lib
from moe_jax.validation import require

SOURCE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                          'remote_code_files')
SOURCE_FILES = ('configuration_moe_jax.py', 'modeling_moe_jax.py')
AUTO_MAP = {
    'AutoConfig': 'configuration_moe_jax.MoeJaxConfig',
    'AutoModelForCausalLM': 'modeling_moe_jax.MoeJaxForCausalLM',
}


class RemoteCodeError(ValueError):
  """The model has a feature the remote-code port does not implement."""


def plain_json(value: Any) -> Any:
  """kwargs -> JSON values: tuples to lists, dtypes to their names."""
  if isinstance(value, Mapping):
    return {str(k): plain_json(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [plain_json(v) for v in value]
  if isinstance(value, (bool, str)) or value is None:
    return value
  if isinstance(value, (int, np.integer)):
    return int(value)
  if isinstance(value, (float, np.floating)):
    return float(value)
  try:
    return jnp.dtype(value).name
  except TypeError as e:
    raise RemoteCodeError(f'{value!r} ({type(value).__name__}) has no JSON '
                          'form') from e


def router_config(kwargs: Mapping[str, Any]) -> dict[str, Any] | None:
  """The MoE layers' RouterConfig with every field resolved (None if dense)."""
  if kwargs.get('dense_ffn'):
    return None
  ffn = kwargs['ffn']
  cfg = router_lib.make_config(
      ffn.get('router', 'smoe'), num_experts=ffn['num_experts'],
      top_k=ffn['top_k'], d_model=ffn['d_model'],
      **dict(ffn.get('router_options') or {}))
  return plain_json(dataclasses.asdict(cfg))


def check_exportable(kwargs: Mapping[str, Any]) -> None:
  """Refuses what modeling_moe_jax.py does not implement."""
  if kwargs.get('sliding_window'):
    raise RemoteCodeError(
        f"sliding_window={kwargs['sliding_window']}: the remote-code port "
        'attends to every earlier position (sliding_window None)')
  if kwargs.get('dense_ffn'):
    return
  ffn = kwargs['ffn']
  if ffn.get('capacity_factor') is not None:
    raise RemoteCodeError(
        f"ffn.capacity_factor={ffn['capacity_factor']}: the remote-code port "
        'is dropless only (capacity_factor None)')
  require(ffn.get('router', 'smoe') in router_lib.ROUTERS, 'router',
          f'one of {sorted(router_lib.ROUTERS)}', ffn.get('router'))


def hf_config(kwargs: Mapping[str, Any],
              max_position_embeddings: int | None = None) -> dict[str, Any]:
  """config.json of the package."""
  config = {
      'model_type': 'moe_jax',
      'architectures': ['MoeJaxForCausalLM'],
      'auto_map': dict(AUTO_MAP),
      'moe_jax_kwargs': plain_json(kwargs),
      'moe_jax_router': router_config(kwargs),
      'vocab_size': int(kwargs['vocab_size']),
      'hidden_size': int(kwargs['d_model']),
      'num_hidden_layers': int(kwargs['num_layers']),
      'num_attention_heads': int(kwargs['num_heads']),
      'num_key_value_heads': int(kwargs.get('num_kv_heads') or
                                 kwargs['num_heads']),
      'head_dim': int(kwargs['head_dim']),
      # The model ties its logits itself (moe_jax tie_embeddings).
      'tie_word_embeddings': False,
      'dtype': 'float32',
  }
  if max_position_embeddings is not None:
    config['max_position_embeddings'] = int(max_position_embeddings)
  return config


def flat_tensors(tree: Mapping | None, prefix: str = ''
                 ) -> Iterator[tuple[str, np.ndarray]]:
  """(flax path joined with '.', float32 array) of every leaf."""
  for name, value in (tree or {}).items():
    key = f'{prefix}{name}'
    if isinstance(value, Mapping):
      yield from flat_tensors(value, key + '.')
    else:
      yield key, np.asarray(value, np.float32)


def tensors(params: Mapping, router_state: Mapping | None
            ) -> dict[str, np.ndarray]:
  """Parameters and router state under one key space (no key twice)."""
  out = dict(flat_tensors(nn.unbox(params)))
  for key, value in flat_tensors(nn.unbox(router_state or {})):
    if key in out:
      raise RemoteCodeError(f'router state {key!r} clashes with a parameter')
    out[key] = value
  return out


def export_remote_code(kwargs: Mapping[str, Any], params: Mapping,
                       router_state: Mapping | None, *, out_dir: str,
                       tokenizer_dir: str | None = None,
                       max_position_embeddings: int | None = None,
                       max_shard_bytes: int = 5 * 2**30) -> str:
  """Writes the remote-code directory `out_dir` (must not exist); returns it.

  Args:
    kwargs: TransformerLM kwargs (decoder.TransformerLM(**kwargs)).
    params: its 'params' collection.
    router_state: its 'router_state' collection (None or {} if stateless).
    out_dir: the new directory.
    tokenizer_dir: a directory whose tokenizer files are copied in.
    max_position_embeddings: the context length tools should assume
      (written to config.json when given; lm-eval reads it).
    max_shard_bytes: the most tensor bytes per safetensors shard.
  """
  check_exportable(kwargs)
  if os.path.exists(out_dir):
    raise FileExistsError(f'{out_dir} exists; export writes a new directory')
  parent = os.path.dirname(os.path.abspath(out_dir))
  os.makedirs(parent, exist_ok=True)
  staging = tempfile.mkdtemp(dir=parent, prefix='.export-')
  try:
    with open(os.path.join(staging, 'config.json'), 'w') as f:
      json.dump(hf_config(kwargs, max_position_embeddings), f, indent=2,
                sort_keys=True)
    for name in SOURCE_FILES:
      shutil.copyfile(os.path.join(SOURCE_DIR, name),
                      os.path.join(staging, name))
    with safetensors_io.ShardedWriter(staging,
                                      max_shard_bytes=max_shard_bytes) as w:
      for key, array in sorted(tensors(params, router_state).items()):
        w.add(key, array)
    hf_export.copy_tokenizer_files(tokenizer_dir, staging)
    os.replace(staging, out_dir)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
  return out_dir
