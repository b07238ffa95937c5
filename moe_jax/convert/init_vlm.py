"""Where a VLM stage starts: the previous stage, or Hugging Face models.

    resolve(config, workdir)          # fills the model's sizes, in place
    params, router_state = initial_variables(config)

A stage (moe_jax/vlm_experiment.py) starts from
  - `config.init.previous_stage`, a workdir of the previous stage: its
    resolved config.json gives the LLM, the tower, the tokenizer and the
    image processor; its newest checkpoint gives the weights; or
  - `config.init.llm_hf_path` (a dense LLM: Phi-3 / Llama family, read by
    convert/families.py) and `config.init.vision_hf_path` (SigLIP / CLIP,
    convert/vision_families.py), with a fresh projector (torch.nn.Linear's
    default init, as LLaVA draws its mm_projector).
When the stage's tower or projector is MoE and the starting weights are
dense, they are upcycled (convert/upcycle_vlm.py, algorithms.md §10.1):
every expert a copy of the dense MLP, routers N(0, 0.02²) from LibMoE's
seed 42 in every layer.

'tiny:<family>' as an HF path ('tiny:phi3', 'tiny:siglip', 'tiny:clip')
names a tiny random model written into `<workdir>/hf/<family>` the first
time (deterministic), and 'tiny:shapes' as data.train_path the built-in
coloured-shapes set in `<workdir>/data/shapes`, so the `:tiny` stages run on
a fresh clone with no download. The resolved config names the written
directories, so a resumed run and the next stage find them.
"""

from __future__ import annotations

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from moe_jax import restore
from moe_jax import run_log
from moe_jax.convert import families
from moe_jax.convert import hf_import
from moe_jax.convert import tiny as tiny_lib
from moe_jax.convert import upcycle_vlm
from moe_jax.convert import vision_families
from moe_jax.data import tiny_vlm
from moe_jax.data import tokenizer as tokenizer_lib
from moe_jax.models import llava as llava_lib
from moe_jax.models import vision

ConfigDict = ml_collections.ConfigDict

TINY = 'tiny:'
IMAGE_TOKEN = '<image>'
# Fields a stage takes over from the previous stage's resolved config.
_INHERITED = ('model', 'dense', 'vision')
_INHERITED_FIELDS = (('vlm', 'projector_width'), ('vlm', 'image_token_id'),
                     ('data', 'tokenizer'), ('data', 'vocab_size'),
                     ('data', 'image_processor'), ('init', 'llm_hf_path'),
                     ('init', 'vision_hf_path'))


def _tiny_path(path: str, workdir: str, field: str) -> str:
  """The directory of a 'tiny:<family>' path, written when absent."""
  family = path[len(TINY):]
  out = os.path.join(workdir, 'hf', family)
  if os.path.isdir(out):
    return out
  if family == 'phi3':
    tiny_lib.write_tiny_hf(out, family='phi3')
  elif family in ('siglip', 'clip'):
    vision_families.write_tiny_tower(out, kind=family)
  else:
    raise ValueError(f'{field}: {path!r}: expected tiny:phi3, tiny:siglip or '
                     'tiny:clip')
  return out


def _hf_dir(config: ConfigDict, field: str, workdir: str) -> str:
  path = config.init[field]
  if path.startswith(TINY):
    return _tiny_path(path, workdir, f'config.init.{field}')
  if not os.path.isdir(path):
    raise FileNotFoundError(
        f'config.init.{field}: {path!r} is not a directory (expected a '
        'Hugging Face model directory with config.json and safetensors, or '
        "'tiny:...')")
  return os.path.abspath(path)


def _image_token_id(tokenizer_dir: str) -> int:
  """'<image>''s id, or the vocabulary size (never embedded) without one."""
  tokenizer = tokenizer_lib.HFTokenizer(tokenizer_dir)
  index = tokenizer.token_to_id(IMAGE_TOKEN)
  return tokenizer.vocab_size if index is None else int(index)


def _resolve_data(config: ConfigDict, workdir: str) -> None:
  data = config.data
  if data.train_path.startswith(TINY):
    if data.train_path != 'tiny:shapes':
      raise ValueError(f'config.data.train_path: {data.train_path!r}: '
                       "expected 'tiny:shapes' or a LLaVA JSON file")
    shapes = data.shapes
    out = tiny_vlm.write_shapes_dataset(
        os.path.join(workdir, 'data', 'shapes'), num_train=shapes.num_train,
        num_eval=shapes.num_eval, image_size=shapes.image_size,
        seed=shapes.seed)
    # Captions for the 'plain' template (PT), question-answer turns else.
    plain = data.template == 'plain'
    data.train_path = out.pretrain_json if plain else out.sft_json
    data.eval_path = data.eval_path or (out.pretrain_valid_json if plain
                                        else out.sft_valid_json)
    data.image_dir = out.image_dir


def resolve(config: ConfigDict, workdir: str) -> None:
  """Fills the model, tokenizer and image fields of a VLM stage, in place."""
  workdir = os.path.abspath(workdir)
  with config.unlocked():
    _resolve_data(config, workdir)
    previous = config.init.previous_stage
    if previous:
      saved = run_log.load_saved_config(previous)
      for name in _INHERITED:
        config[name] = saved[name]
      for part, name in _INHERITED_FIELDS:
        config[part][name] = saved[part][name]
    else:
      llm_dir = _hf_dir(config, 'llm_hf_path', workdir)
      vision_dir = _hf_dir(config, 'vision_hf_path', workdir)
      config.init.llm_hf_path, config.init.vision_hf_path = (llm_dir,
                                                             vision_dir)
      hf = hf_import.read_hf_config(llm_dir)
      family = families.family_of(hf, os.path.join(llm_dir, 'config.json'))
      kwargs = families.model_kwargs(hf, family)
      ffn = kwargs.pop('ffn')
      kwargs.pop('dense_ffn')
      for name, value in kwargs.items():
        config.model[name] = value
      config.dense = ConfigDict(dict(ffn, w_in_std=0.02, w_out_std=0.02))
      tower = vision.tower_kwargs_from_hf(
          hf_import.read_hf_config(vision_dir))
      for name, value in tower.items():
        if name in config.vision and name not in ('feature_layer',
                                                  'feature_select'):
          config.vision[name] = value
      config.vlm.projector_width = config.model.d_model
      config.vlm.image_token_id = _image_token_id(llm_dir)
      config.data.tokenizer = llm_dir
      config.data.vocab_size = config.model.vocab_size
      config.data.image_processor = os.path.join(vision_dir,
                                                 'preprocessor_config.json')
    # The MoE fields that the tower's MLP defines (the projector sets its
    # own in models/llava.py).
    config.moe.d_model = config.vision.d_model
    config.moe.expert_width = config.vision.mlp_width
    config.moe.activation = config.vision.activation


def _previous_variables(config: ConfigDict) -> tuple[dict, dict, ConfigDict]:
  previous = config.init.previous_stage
  saved = run_log.load_saved_config(previous)
  run = restore.restore_run(saved, previous, what='start the next stage from')
  return (jax.tree.map(np.asarray, run.params),
          jax.tree.map(np.asarray, dict(run.router_state or {})), saved)


def fresh_projector(model, seed: int) -> dict:
  """A new dense mlp2x_gelu projector's parameters, as LLaVA draws them.

  LLaVA builds `mm_projector` from plain torch.nn.Linear layers after the
  LLM is loaded, so it keeps torch's default init: every weight and bias
  ~ U(±1/√fan_in) (kaiming_uniform with a=√5), fan_in = D_in for the first
  layer and W for the second.

  Args:
    model: the stage's Llava (its projector_in D_in and projector_width W).
    seed: the draw's seed (config.train.seed).
  Returns:
    The projector's parameter tree, leaves w_in [D_in, W], b_in [W],
    w_out [W, W], b_out [W].
  """
  d_in, width = model.projector_in, model.projector_width
  projector = llava_lib.Projector(d_in, width)
  shapes = jax.eval_shape(lambda: nn.unbox(projector.init(
      jax.random.key(0), jnp.zeros((1, 1, d_in), jnp.float32))))['params']
  fan_in = {'w_in': d_in, 'b_in': d_in, 'w_out': width, 'b_out': width}
  keys = dict(zip(sorted(fan_in), jax.random.split(jax.random.key(seed), 4)))

  def draw(path, leaf):
    name = path[-1].key
    bound = 1.0 / np.sqrt(fan_in[name])
    return np.asarray(jax.random.uniform(keys[name], leaf.shape, jnp.float32,
                                         -bound, bound))

  return jax.tree_util.tree_map_with_path(draw, shapes)


def _hf_variables(config: ConfigDict, model) -> dict:
  """LLM and tower from their HF directories, a fresh projector."""
  _, llm, _ = hf_import.import_hf(config.init.llm_hf_path, progress=False)
  _, tower = vision_families.import_tower(config.init.vision_hf_path)
  return {'vision': tower, 'projector': fresh_projector(model,
                                                        config.train.seed),
          'llm': llm}


def _dense_sites(params: dict) -> tuple[str, ...]:
  """The sites ('tower', 'projector') whose MLPs are dense in `params`."""
  sites = []
  if 'ffn' in params['vision']['layer_0']:
    sites.append('tower')
  if 'ffn' in params['projector']:
    sites.append('projector')
  return tuple(sites)


def initial_variables(config: ConfigDict, model) -> tuple[dict, dict]:
  """(params, router_state) a stage starts from (module docstring).

  Args:
    config: the resolved stage config.
    model: the stage's Llava model (models.build(config)).
  """
  if config.init.previous_stage:
    params, router_state, _ = _previous_variables(config)
  else:
    params, router_state = _hf_variables(config, model), {}
  wanted = tuple(site for site, kind in (('tower', config.vlm.tower_ffn),
                                         ('projector',
                                          config.vlm.projector_ffn))
                 if kind == 'moe')
  to_upcycle = tuple(s for s in wanted if s in _dense_sites(params))
  if to_upcycle:
    params, router_state = upcycle_vlm.upcycle_llava(
        model, params, sites=to_upcycle, noise=config.init.upcycle.noise,
        seed=config.init.upcycle.seed,
        router_seed=config.init.upcycle.router_seed,
        router_state=router_state)
  return (jax.tree.map(jnp.asarray, params),
          jax.tree.map(jnp.asarray, router_state))


def describe(config: ConfigDict) -> str:
  """Where the stage starts, for the log."""
  if config.init.previous_stage:
    start = f'the newest checkpoint of {config.init.previous_stage}'
  else:
    start = (f'{config.init.llm_hf_path} + {config.init.vision_hf_path} '
             '(random projector: torch Linear init)')
  moe = [s for s, kind in (('tower', config.vlm.tower_ffn),
                           ('projector', config.vlm.projector_ffn))
         if kind == 'moe']
  if moe:
    start += (f'; {" and ".join(moe)} MLPs as {config.moe.num_experts} '
              f'{config.moe.router} experts')
  return start

