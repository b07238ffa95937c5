"""Importing a Hugging Face checkpoint directory into a moe_jax decoder.

    model, params, kwargs = import_hf(hf_dir)
    logits, _ = model.apply({'params': params}, tokens)

reads `config.json`, picks the family's key table (families.py), checks the
checkpoint's keys and shapes against it before reading any tensor (a
missing, unexpected or mis-shaped key is an error naming the key, the
expected shape and the file), then reads one tensor at a time into float32
parameters (house rule: parameters are float32; matmuls run in the
compute dtype). The result is checked against the model's own parameter
tree, so a table and the decoder cannot drift apart silently.

Dimension legend: see families.py.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from moe_jax.convert import families
from moe_jax.convert import safetensors_io
from moe_jax.models import decoder

# Checkpoint keys that hold no parameter (buffers some versions saved).
IGNORED_SUFFIXES = ('rotary_emb.inv_freq',)


def read_hf_config(hf_dir: str) -> dict[str, Any]:
  """config.json of an HF model directory, with a clear error if absent."""
  path = os.path.join(hf_dir, 'config.json')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path}: no config.json (expected a Hugging '
                            'Face model directory, as save_pretrained '
                            'writes)')
  with open(path, encoding='utf-8') as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f'{path}: not JSON ({e})') from None


def check_keys(checkpoint: safetensors_io.ShardedCheckpoint,
               table: Iterable[families.Entry], *, tied: bool) -> None:
  """Missing, unexpected or mis-shaped keys -> ValueError naming them."""
  expected: dict[str, tuple[int, ...]] = {}
  for item in table:
    expected.update(zip(item.hf_keys, item.shapes))
  present = set(checkpoint.keys())
  problems = []
  for key in sorted(set(expected) - present):
    problems.append(f'missing key {key} (expected shape {expected[key]}) '
                    f'in {checkpoint.directory}')
  for key in sorted(present - set(expected)):
    if key.endswith(IGNORED_SUFFIXES) or (tied and key == 'lm_head.weight'):
      continue
    problems.append(f'unexpected key {key} {checkpoint.shape(key)} in '
                    f'{os.path.join(checkpoint.directory, checkpoint.shard_of(key))}')
  for key in sorted(set(expected) & present):
    if tuple(checkpoint.shape(key)) != tuple(expected[key]):
      problems.append(f'key {key} in {os.path.join(checkpoint.directory, checkpoint.shard_of(key))} has shape '
                      f'{tuple(checkpoint.shape(key))}, expected '
                      f'{tuple(expected[key])}')
  if problems:
    shown = problems[:12]
    more = len(problems) - len(shown)
    raise ValueError('the checkpoint does not match its config.json:\n  ' +
                     '\n  '.join(shown) +
                     (f'\n  ... and {more} more' if more else ''))


def _set(tree: dict, path: tuple[str, ...], value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def read_params(checkpoint: safetensors_io.ShardedCheckpoint,
                table: list[families.Entry], *, progress: bool = True
                ) -> dict:
  """The flax parameter tree, one tensor (or fused pair) read at a time."""
  params: dict = {}
  last_key, last_array = None, None
  for item in tqdm(table, desc='import', unit='tensor', disable=not progress):
    arrays = []
    for key in item.hf_keys:
      # A fused tensor feeds consecutive entries (Phi-3 q, k, v): read once.
      if key != last_key:
        last_key, last_array = key, checkpoint.get(key)
      arrays.append(last_array.astype(np.float32))
    _set(params, item.path, jnp.asarray(item.to_jax(*arrays)))
  return params


def check_against_model(model: decoder.TransformerLM, params: dict) -> None:
  """The imported tree has exactly the model's parameter names and shapes."""
  tokens = jnp.zeros((1, 2), jnp.int32)
  want = jax.eval_shape(lambda: model.init(jax.random.key(0), tokens))
  want = nn.unbox(want)
  want = {jax.tree_util.keystr(p): tuple(a.shape) for p, a in
          jax.tree_util.tree_flatten_with_path(want['params'])[0]}
  got = {jax.tree_util.keystr(p): tuple(a.shape) for p, a in
         jax.tree_util.tree_flatten_with_path(params)[0]}
  if want != got:
    diff = sorted(set(want.items()) ^ set(got.items()))[:8]
    raise AssertionError(f'key table and decoder disagree: {diff}')


def import_hf(hf_dir: str, *, progress: bool = True
              ) -> tuple[decoder.TransformerLM, dict, dict[str, Any]]:
  """(model, params, TransformerLM kwargs) of an HF model directory."""
  hf = read_hf_config(hf_dir)
  family = families.family_of(hf, os.path.join(hf_dir, 'config.json'))
  kwargs = families.model_kwargs(hf, family)
  table = families.key_table(hf, family)
  checkpoint = safetensors_io.ShardedCheckpoint(hf_dir)
  check_keys(checkpoint, table, tied=kwargs['tie_embeddings'])
  params = read_params(checkpoint, table, progress=progress)
  model = decoder.TransformerLM(**kwargs, dtype=jnp.float32)
  check_against_model(model, params)
  return model, params, kwargs
