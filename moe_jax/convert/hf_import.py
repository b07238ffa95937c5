"""Importing a Hugging Face checkpoint directory into a moe_jax decoder.

    model, params, kwargs = import_hf(hf_dir)
    logits, _ = model.apply({'params': params}, tokens)

reads `config.json`, picks the family's key table (families.py for the
dense families, moe_families.py for the MoE ones, whose routed experts may
be stored per expert or fused in 3D tensors), checks the
checkpoint's keys and shapes against it before reading any tensor (a
missing, unexpected or mis-shaped key is an error naming the key, the
expected shape and the file), then reads one tensor at a time into float32
parameters (house rule: parameters are float32; matmuls run in the
compute dtype). The result is checked against the model's own parameter
tree, so a table and the decoder cannot drift apart silently.

Routers that keep non-trainable state (glm4_moe's e_score_correction_bias,
in the 'router_state' collection) need `import_hf_with_state`, which also
returns that collection; `import_hf` refuses them rather than drop it.

Dimension legend: see families.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Iterable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from moe_jax.convert import families
from moe_jax.convert import moe_families
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
               table: Iterable[families.Entry], *, tied: bool,
               ignore: Callable[[str], bool] | None = None) -> None:
  """Missing, unexpected or mis-shaped keys -> ValueError naming them.

  `ignore(key)` marks further checkpoint keys that hold nothing the model
  uses (not reported as unexpected).
  """
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
    if ignore is not None and ignore(key):
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


def get_path(tree: Mapping, path: tuple[str, ...]):
  """tree[path[0]][path[1]]...: the subtree or leaf at a parameter path."""
  for key in path:
    tree = tree[key]
  return tree


def set_path(tree: dict, path: tuple[str, ...], value) -> None:
  """Sets tree[path[0]]...[path[-1]] = value in place, creating dicts on
  the way."""
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
    set_path(params, item.path, jnp.asarray(item.to_jax(*arrays)))
  return params


def check_against_model(model: decoder.TransformerLM, params: dict,
                        collection: str = 'params') -> None:
  """The imported tree has exactly the model's names and shapes in
  `collection` ('params', or 'router_state')."""
  tokens = jnp.zeros((1, 2), jnp.int32)
  want = jax.eval_shape(lambda: model.init(jax.random.key(0), tokens))
  want = nn.unbox(want)
  want = {jax.tree_util.keystr(p): tuple(a.shape) for p, a in
          jax.tree_util.tree_flatten_with_path(
              dict(want.get(collection, {})))[0]}
  got = {jax.tree_util.keystr(p): tuple(a.shape) for p, a in
         jax.tree_util.tree_flatten_with_path(params)[0]}
  if want != got:
    diff = sorted(set(want.items()) ^ set(got.items()))[:8]
    raise AssertionError(f'key table and decoder disagree: {diff}')


def _family(hf: dict[str, Any], source: str) -> tuple[str, bool]:
  """(family, is_moe) of an HF config; errors name the file."""
  moe = moe_families.family_of(hf)
  if moe is not None:
    return moe, True
  archs = hf.get('architectures') or []
  if not archs or archs[0] not in families.ARCHITECTURES:
    supported = sorted({**families.ARCHITECTURES,
                        **moe_families.ARCHITECTURES})
    raise ValueError(f'{source}: architectures {archs} is not one moe_jax '
                     f'imports; supported: {supported}')
  return families.family_of(hf, source), False


@dataclasses.dataclass(frozen=True)
class ImportPlan:
  """What importing an HF directory will read and where it goes.

  hf: its config.json; family: the key-table family; kwargs: the
  TransformerLM options; table / state_table: the 'params' and
  'router_state' entries; ignore: checkpoint keys with no parameter;
  checkpoint: the opened (lazy) safetensors checkpoint.
  """

  hf: dict[str, Any]
  family: str
  kwargs: dict[str, Any]
  table: list[families.Entry]
  state_table: list[families.Entry]
  ignore: Any
  checkpoint: safetensors_io.ShardedCheckpoint


def plan_import(hf_dir: str) -> ImportPlan:
  """The ImportPlan of `hf_dir`, its keys and shapes checked (no tensor is
  read yet): errors name the key, the expected shape and the file."""
  hf = read_hf_config(hf_dir)
  family, is_moe = _family(hf, os.path.join(hf_dir, 'config.json'))
  # The config's options are checked (and refused) before any file opens.
  kwargs = (moe_families.model_kwargs(hf, family) if is_moe
            else families.model_kwargs(hf, family))
  checkpoint = safetensors_io.ShardedCheckpoint(hf_dir)
  if is_moe:
    # Routed experts per expert or fused in 3D tensors, as the file has it.
    layout = moe_families.layout_of(checkpoint.keys())
    table = moe_families.key_table(hf, family, layout)
    state_table = moe_families.state_table(hf, family)
    ignore = moe_families.ignored(hf, family)
  else:
    table = families.key_table(hf, family)
    state_table, ignore = [], None
  check_keys(checkpoint, table + state_table,
             tied=kwargs['tie_embeddings'], ignore=ignore)
  return ImportPlan(hf, family, kwargs, table, state_table, ignore,
                    checkpoint)


def import_hf_with_state(hf_dir: str, *, progress: bool = True
                         ) -> tuple[decoder.TransformerLM, dict, dict,
                                    dict[str, Any]]:
  """(model, params, router_state, kwargs) of an HF model directory.

  router_state is the model's 'router_state' collection ({} when its
  router keeps none); apply with {'params': params, 'router_state': ...}.
  """
  plan = plan_import(hf_dir)
  params = read_params(plan.checkpoint, plan.table, progress=progress)
  router_state = read_params(plan.checkpoint, plan.state_table,
                             progress=False)
  model = decoder.TransformerLM(**plan.kwargs, dtype=jnp.float32)
  check_against_model(model, params)
  check_against_model(model, router_state, 'router_state')
  return model, params, router_state, plan.kwargs


def import_hf(hf_dir: str, *, progress: bool = True
              ) -> tuple[decoder.TransformerLM, dict, dict[str, Any]]:
  """(model, params, TransformerLM kwargs) of an HF model directory.

  Refuses models whose routers keep state (see import_hf_with_state).
  """
  model, params, router_state, kwargs = import_hf_with_state(
      hf_dir, progress=progress)
  if router_state:
    raise ValueError(
        f'{hf_dir}: this model\'s router keeps state (the '
        "'router_state' collection, e.g. e_score_correction_bias); use "
        'import_hf_with_state, which returns it')
  return model, params, kwargs
