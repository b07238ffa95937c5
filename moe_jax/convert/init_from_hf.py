"""Starting a training run from a Hugging Face checkpoint (config.init).

    --config=configs/upcycle/llama_smoe.py --config.init.hf_path=DIR

`resolve(config)` rewrites the model part of an experiment config from the
HF directory's config.json, before anything else reads it: `config.model`
becomes the family's TransformerLM options (moe_jax/convert/families.py),
`config.dense` its SwiGLU MLP, or, when `config.init.upcycle.router` is set,
`config.moe` the upcycled MoE layer (moe_jax/convert/upcycle.py), and
`config.data` the HF tokenizer and vocabulary. The resolved config is what
the workdir's config.json records, so a resumed run and the analyses rebuild
the same model.

`initial_variables(config)` gives the imported (and upcycled) parameters
that replace the random init of a fresh run.

Upcycled routers are drawn with `config.moe.router_options` (init_std
included): the configs/upcycle/*.py experiments set init_std to
upcycle.ROUTER_STD = 0.02 (algorithms.md §10.1, LibMoE's std_gate), so
`--config.moe.router_options.init_std=S` is how a run asks for another std.
A plain LM config given init.upcycle.router keeps its size preset's std.
"""

from __future__ import annotations

import os
from typing import Any

import ml_collections

from moe_jax.convert import families
from moe_jax.convert import hf_import
from moe_jax.convert import moe_families
from moe_jax.convert import upcycle

ConfigDict = ml_collections.ConfigDict


def _upcycle_settings(config: ConfigDict) -> dict[str, Any]:
  up = config.init.upcycle
  return dict(router=up.router, num_experts=up.num_experts, top_k=up.top_k,
              granularity=up.granularity, shared_experts=up.shared_experts,
              shared_mix=up.shared_mix, noise=up.noise, seed=up.seed,
              router_seed=up.router_seed,
              router_options=config.moe.router_options.to_dict())


def _refuse_moe(hf: dict[str, Any], hf_dir: str) -> None:
  """A clear error for an MoE checkpoint: runs start from dense models."""
  family = moe_families.family_of(hf)
  if family:
    raise ValueError(
        f"{os.path.join(hf_dir, 'config.json')}: architectures "
        f"{hf['architectures']} is an MoE checkpoint (family {family}); "
        'config.init.hf_path (and `python -m moe_jax.convert import / '
        'upcycle`) start runs from a dense Llama / Mistral / Qwen2 / Qwen3 '
        '/ Phi-3 model only. `python -m moe_jax.convert inspect '
        '--hf_dir=DIR` shows how it maps, and moe_jax.convert.hf_import.'
        'import_hf(DIR) loads it as a TransformerLM in Python')


def resolve(config: ConfigDict) -> None:
  """Fills config.model / moe / dense / data from config.init.hf_path."""
  hf_dir = config.init.hf_path
  if not os.path.isdir(hf_dir):
    raise FileNotFoundError(f'config.init.hf_path: {hf_dir!r} is not a '
                            'directory (expected a Hugging Face model '
                            'directory with config.json and safetensors)')
  hf = hf_import.read_hf_config(hf_dir)
  _refuse_moe(hf, hf_dir)
  family = families.family_of(hf, os.path.join(hf_dir, 'config.json'))
  kwargs = families.model_kwargs(hf, family)
  ffn = kwargs.pop('ffn')
  dense = kwargs.pop('dense_ffn')
  del dense
  router = config.init.upcycle.router
  with config.unlocked():
    config.data.vocab_size = kwargs['vocab_size']
    config.data.tokenizer_type = 'hf'
    config.data.tokenizer = hf_dir
    for name, value in kwargs.items():
      config.model[name] = value
    config.model.dense_ffn = not router
    if router:
      settings = _upcycle_settings(config)
      moe = upcycle.moe_ffn_kwargs(
          ffn, router=router, num_experts=settings['num_experts'],
          top_k=settings['top_k'], granularity=settings['granularity'],
          shared_experts=settings['shared_experts'],
          shared_mix=settings['shared_mix'],
          router_options=settings['router_options'],
          losses=tuple(config.moe.losses), backend=config.moe.backend)
      for name, value in moe.items():
        config.moe[name] = value
    else:
      dense_cfg = ConfigDict(dict(ffn, w_in_std=0.02, w_out_std=0.02))
      config.dense = dense_cfg


def initial_variables(config: ConfigDict) -> tuple[dict, dict]:
  """(params, router_state) of the imported (and upcycled) model."""
  _, params, kwargs = hf_import.import_hf(config.init.hf_path)
  if not config.init.upcycle.router:
    return params, {}
  _, params, router_state = upcycle.upcycle(
      kwargs, params, **_upcycle_settings(config),
      losses=tuple(config.moe.losses), backend=config.moe.backend)
  return params, router_state
