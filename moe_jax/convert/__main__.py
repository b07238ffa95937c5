"""Command line of the Hugging Face conversions: python -m moe_jax.convert.

  tiny     --family=llama|qwen2|qwen3 --out=DIR
           a tiny random HF model directory (moe_jax/convert/tiny.py)
  inspect  --hf_dir=DIR
           its architecture, family, the TransformerLM options it imports
           as, every checkpoint key with shape, dtype and the moe_jax path
           it maps to, and the parameter count
  import   --hf_dir=DIR --workdir=W [--config=FILE[:arg]]
  upcycle  --hf_dir=DIR --router=R --num_experts=E --top_k=K --workdir=W
           [--granularity --shared_experts --shared_mix --noise --seed
           --router_seed --config=FILE[:arg]]
           a new moe_jax run directory: the resolved config.json and a
           step-0 checkpoint of the imported (upcycled) model, which
           `python -m moe_jax.main --config=... --workdir=W` trains on
           from (a fresh data iterator: the checkpoint has no data state)
           and --mode=trace / droptop / similarity analyse
  export   --workdir=W --to=TARGET --out=DIR [--config=FILE[:arg]]
           the workdir's newest checkpoint as an HF directory of a target
           of hf_export.TARGETS (dense, mixtral, qwen2_moe, ...), with the
           tokenizer files of an HF-tokenized run; a VLM run (model_name
           'llava') with --to=llava: a LlavaForConditionalGeneration
           directory with its processor files (convert/llava_export.py;
           dense tower and projector only: PT / PFT stages)

import / upcycle start from the tiny CPU experiment of the router
(configs/dense_154m.py:tiny, or configs/upcycle/*_<R>.py:tiny) unless
--config names another; export rebuilds the model from W/config.json (the
resolved config) unless --config is given. Progress bars are tqdm's, from
the library calls, on stderr. Every error is one line on stderr,
`moe_jax.convert: error: ...`, with exit status 2 (as argparse's own).

This module uses argparse: only moe_jax/main.py defines absl flags.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import pathlib
import re
import sys
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from moe_jax import checkpoint as checkpoint_lib
from moe_jax import config_lib
from moe_jax import models
from moe_jax import restore
from moe_jax import router_recipes
from moe_jax import run_log
from moe_jax import state as state_lib
from moe_jax import upcycle_experiment
from moe_jax.convert import hf_export
from moe_jax.convert import hf_import
from moe_jax.convert import init_from_hf
from moe_jax.convert import init_vlm
from moe_jax.convert import llava_export
from moe_jax.convert import tiny
from moe_jax.convert import upcycle as upcycle_lib
from moe_jax.data import tokenizer as tokenizer_lib
from moe_jax.models import decoder
from moe_jax.models import llava

ConfigDict = ml_collections.ConfigDict
PROG = 'moe_jax.convert'
# The repository's configs/ (for the command hints printed after import).
CONFIGS = pathlib.Path(__file__).resolve().parents[2] / 'configs'
# Errors that are the user's to fix: reported in one line, no traceback.
USER_ERRORS = (ValueError, OSError, checkpoint_lib.CheckpointCorrupt,
               checkpoint_lib.CheckpointSaveError)
# init.upcycle fields that the upcycle subcommand's options set.
# export --to: the LLM targets, and 'llava' for a VLM run.
LLAVA_TARGET = 'llava'
EXPORT_TARGETS = hf_export.TARGETS + (LLAVA_TARGET,)
# Llava fields that make the kwargs llava_export reads.
LLAVA_FIELDS = ('tower', 'llm', 'projector_width', 'image_token_id',
                'tower_ffn', 'projector_ffn', 'moe', 's2_scales')
UPCYCLE_FIELDS = ('router', 'num_experts', 'top_k', 'granularity',
                  'shared_experts', 'shared_mix', 'noise', 'seed',
                  'router_seed')


def one_line(error: BaseException) -> str:
  """The error's message on one line ('a:\\n  b\\n  c' -> 'a: b; c')."""
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  if not lines:
    return type(error).__name__
  text = lines[0]
  for line in lines[1:]:
    text += (' ' if text.endswith(':') else '; ') + line
  return text


# ----------------------------------------------------------------------------
# tiny

def cmd_tiny(args: argparse.Namespace) -> None:
  out = tiny.write_tiny_hf(
      args.out, args.family, vocab_size=args.vocab_size,
      d_model=args.d_model, num_layers=args.num_layers,
      num_heads=args.num_heads, num_kv_heads=args.num_kv_heads,
      head_dim=args.head_dim, intermediate_size=args.intermediate_size,
      tie_embeddings=args.tie_embeddings, seed=args.seed, progress=True)
  print(f'wrote a tiny random {args.family} model to {out}')


# ----------------------------------------------------------------------------
# inspect

def _natural(key: str) -> list:
  """Sort key: model.layers.2 before model.layers.10."""
  return [int(p) if p.isdigit() else p for p in re.split(r'(\d+)', key)]


def describe(hf_dir: str) -> dict[str, Any]:
  """What `inspect` prints, as data.

  Returns:
    {'architecture', 'family', 'moe', 'kwargs' (TransformerLM options),
    'rows': [(key, shape, dtype name, moe_jax path(s) or a note)],
    'parameters', 'tensors', 'bytes'}.

  Raises:
    ValueError / FileNotFoundError: as hf_import.import_hf raises them
      (unsupported architecture or option, missing, unexpected or
      mis-shaped keys), after nothing is printed.
  """
  plan = hf_import.plan_import(hf_dir)
  hf, family, kwargs = plan.hf, plan.family, plan.kwargs
  table, state_table, checkpoint = (plan.table, plan.state_table,
                                    plan.checkpoint)
  paths: dict[str, list[str]] = {}
  for collection, entries in (('', table), ('router_state:', state_table)):
    for item in entries:
      for i, key in enumerate(item.hf_keys):
        path = collection + '/'.join(item.path)
        if len(item.hf_keys) > 1:
          # Several tensors make one parameter (gate + up -> w_in; E
          # experts stacked): say which part this one is.
          path += f' (part {i + 1} of {len(item.hf_keys)})'
        paths.setdefault(key, []).append(path)
  rows, parameters, size = [], 0, 0
  for key in sorted(checkpoint.keys(), key=_natural):
    shape = tuple(checkpoint.shape(key))
    count = math.prod(shape)
    size += count * checkpoint.dtype(key).itemsize
    if key in paths:
      parameters += count
      where = ', '.join(paths[key])
    else:
      where = ('(not read: the output layer is the tied embedding)'
               if key == 'lm_head.weight' else '(not read)')
    rows.append((key, shape, checkpoint.dtype(key).name, where))
  return {'architecture': hf['architectures'][0], 'family': family,
          'moe': not kwargs.get('dense_ffn'), 'kwargs': kwargs, 'rows': rows,
          'parameters': parameters, 'tensors': len(rows), 'bytes': size}


def cmd_inspect(args: argparse.Namespace) -> None:
  info = describe(args.hf_dir)
  print(f"hf_dir: {os.path.abspath(args.hf_dir)}")
  print(f"architecture: {info['architecture']} (family {info['family']}, "
        f"{'MoE' if info['moe'] else 'dense'})")
  print('TransformerLM options:')
  print(json.dumps(info['kwargs'], indent=2, default=str))
  widths = [max(len(str(row[i])) for row in info['rows'] + [
      ('key', 'shape', 'dtype', '')]) for i in range(3)]
  header = ('key', 'shape', 'dtype', 'moe_jax path')
  for row in [header] + [(k, str(s), d, p) for k, s, d, p in info['rows']]:
    print('  '.join(str(v).ljust(w) for v, w in zip(row[:3], widths)) +
          '  ' + row[3])
  print(f"parameters: {info['parameters']:,} in {info['tensors']} tensors "
        f"({info['bytes'] / 2**20:.1f} MiB on disk)")


# ----------------------------------------------------------------------------
# import / upcycle

def starting_config(spec: str | None, router: str | None) -> ConfigDict:
  """--config's config, else the router's tiny CPU experiment."""
  if spec:
    config = config_lib.load_config(spec)
    if router and ('moe' not in config or config.moe.router != router):
      have = config.moe.router if 'moe' in config else 'dense'
      raise ValueError(
          f'--router={router} but --config={spec} is a {have!r} config (its '
          'moe sub-dict gives the router options and losses); pass a config '
          f'of router {router!r}, e.g. configs/upcycle/llama_{router}.py')
    return config
  if router:
    return upcycle_experiment.experiment(router, 'tiny')
  return router_recipes.experiment('dense', '154m', 'tiny')


def _check_new_workdir(workdir: str) -> None:
  if os.path.isfile(workdir):
    raise FileExistsError(f'--workdir={workdir} is a file')
  if os.path.isdir(workdir) and os.listdir(workdir):
    raise FileExistsError(f'--workdir={workdir} exists and is not empty; '
                          'import writes a new run directory')


def initial_state(config: ConfigDict) -> state_lib.TrainState:
  """The step-0 TrainState of a resolved HF-initialised config.

  The imported (upcycled) variables with a fresh optimiser state, in exactly
  the tree a fresh run of the config builds (state_lib.init_state), so that
  training restores it as its own checkpoint.
  """
  model = models.build(config)
  optimizer, _ = state_lib.make_optimizer(config.train)
  init = functools.partial(state_lib.init_state, model=model,
                           optimizer=optimizer, config=config)
  # Shapes only: the random init is never computed.
  expected = nn.unbox(jax.eval_shape(init, jax.random.key(config.train.seed)))
  params, router_state = init_from_hf.initial_variables(config)
  state = state_lib.TrainState(
      step=jnp.zeros((), jnp.int32), params=params,
      opt_state=optimizer.init(params), router_state=router_state,
      router_hook=state_lib.init_router_hook(config))
  differences = checkpoint_lib.tree_differences(state, expected)
  if differences:
    raise ValueError('the imported variables do not match the config\'s '
                     'model: ' + '; '.join(differences[:8]))
  return state


def write_workdir(config: ConfigDict, workdir: str) -> state_lib.TrainState:
  """Resolves an HF-initialised config and writes the run directory:
  checkpoints/0 (no data state) and config.json."""
  workdir = os.path.abspath(workdir)
  _check_new_workdir(workdir)
  init_from_hf.resolve(config)
  config_lib.validate(config, num_devices=jax.device_count())
  state = initial_state(config)
  os.makedirs(workdir, exist_ok=True)
  checkpoints = checkpoint_lib.Checkpointer(
      os.path.join(workdir, 'checkpoints'), keep=config.train.keep,
      asynchronous=False)
  try:
    # No data has been read: training starts a fresh iterator.
    checkpoints.save(0, state, None)
  finally:
    checkpoints.close()
  # Last: a directory with config.json always holds its checkpoint.
  run_log.write_resolved_config(config, workdir)
  return state


def _overrides(config: ConfigDict, start: ConfigDict) -> list[str]:
  """--config.init.* flags that turn `start` into `config`."""
  out = [f'--config.init.hf_path={config.init.hf_path}']
  for name in UPCYCLE_FIELDS:
    value = config.init.upcycle[name]
    if value != start.init.upcycle[name]:
      out.append(f'--config.init.upcycle.{name}={value}')
  return out


def _report_workdir(config: ConfigDict, start: ConfigDict, spec: str,
                    workdir: str, state: state_lib.TrainState) -> None:
  count = sum(math.prod(a.shape) for a in jax.tree.leaves(state.params))
  router = config.init.upcycle.router
  what = (f'upcycled to {config.init.upcycle.num_experts} {router} experts '
          f'(top-{config.init.upcycle.top_k})' if router else 'dense')
  print(f'wrote {os.path.abspath(workdir)}: config.json and checkpoints/0 '
        f'({count:,} parameters, {what}; no data read yet)')
  print('train: python -m moe_jax.main --config=' + spec + ' ' +
        ' '.join(_overrides(config, start)) + f' --workdir={workdir}')
  kwargs = dict(config.model.to_dict(), ffn=decoder.ffn_kwargs(config))
  reasons = {}
  for target in hf_export.TARGETS:
    try:
      hf_export.check_exportable(kwargs, target)
    except hf_export.ExportError as e:
      reasons[target] = str(e)
      continue
    print(f'export: python -m {PROG} export --workdir={workdir} '
          f'--to={target} --out=DIR')
    return
  reason = reasons['mixtral' if router else 'dense']
  print(f'export: no stock Hugging Face class holds this model ({reason})')


def _hint_config(spec: str | None, router: str | None
                 ) -> tuple[str, ConfigDict]:
  """(config file, its config) for the printed training command.

  The workdir's model is defined by the HF directory and init.upcycle, so
  any config of the router resolves to it given those overrides: the file
  the run started from, else one whose tiny variant is starting_config's.
  """
  if spec:
    return spec, config_lib.load_config(spec)
  if not router:
    return ('configs/dense_154m.py:tiny',
            router_recipes.experiment('dense', '154m', 'tiny'))
  # Every configs/upcycle/<family>_<router>.py returns the same experiment.
  found = sorted(CONFIGS.glob(f'upcycle/*_{router}.py'))
  if found:
    return (f'configs/upcycle/{found[0].name}:tiny',
            upcycle_experiment.experiment(router, 'tiny'))
  # The router's LibMoE config: same MoE options, a pretraining schedule.
  return (f'configs/{router}_154m.py:tiny',
          router_recipes.experiment(router, '154m', 'tiny'))


def cmd_import(args: argparse.Namespace) -> None:
  router = getattr(args, 'router', None)
  config = starting_config(args.config, router)
  with config.unlocked():
    config.init.hf_path = os.path.abspath(args.hf_dir)
    config.init.upcycle.router = router or ''
    for name in UPCYCLE_FIELDS[1:]:
      value = getattr(args, name, None)
      if value is not None:
        config.init.upcycle[name] = value
  state = write_workdir(config, args.workdir)
  spec, start = _hint_config(args.config, router)
  _report_workdir(config, start, spec, args.workdir, state)


# ----------------------------------------------------------------------------
# export

def config_from_workdir(workdir: str) -> ConfigDict:
  """The resolved config a run wrote to W/config.json, as a ConfigDict."""
  try:
    config = run_log.load_saved_config(workdir)
  except FileNotFoundError as e:
    raise FileNotFoundError(f'{e}; pass --config=FILE for a run without '
                            'one') from None
  # config.json holds the model init_from_hf resolved: resolving again would
  # need the HF directory to still exist, and gives the same model.
  config.init.hf_path = ''
  return config


def tokenizer_files(config: ConfigDict) -> tuple[str | None, dict[str, Any]]:
  """(tokenizer directory to copy, config.json fields such as token ids).

  An HF-tokenized run (data.tokenizer_type 'hf') gives its tokenizer
  directory, and that directory's config.json (the imported model's) the
  token ids and context length; else the tokenizer's bos / eos.
  """
  directory = config.data.tokenizer
  if config.data.tokenizer_type != 'hf' or not os.path.isdir(directory):
    return None, {}
  base: dict[str, Any] = {}
  if os.path.isfile(os.path.join(directory, 'config.json')):
    base = hf_import.read_hf_config(directory)
  if base.get('bos_token_id') is None or base.get('eos_token_id') is None:
    tok = tokenizer_lib.HFTokenizer(directory)
    base.setdefault('bos_token_id', tok.bos_id)
    base.setdefault('eos_token_id', tok.eos_id)
  return directory, {k: v for k, v in base.items() if v is not None}


def _plain(value):
  """Module attributes (FrozenDicts, tuples) as plain dicts and values."""
  if isinstance(value, Mapping):
    return {k: _plain(v) for k, v in value.items()}
  return value


def export_llava_run(config: ConfigDict, args: argparse.Namespace) -> None:
  """export --to=llava of a VLM run (config.model_name 'llava')."""
  if args.to != LLAVA_TARGET:
    raise ValueError(f'--to={args.to}: the workdir is a VLM run (model_name '
                     f"'llava'); export it with --to={LLAVA_TARGET}")
  if args.config:
    # A stage config names its HF directories / previous stage; resolving
    # fills the model's sizes, the tokenizer and the image processor.
    init_vlm.resolve(config, args.workdir)
  model = llava.from_config(config)
  kwargs = {name: _plain(getattr(model, name)) for name in LLAVA_FIELDS}
  tokenizer_dir = config.data.tokenizer
  # Before reading the checkpoint: what the class cannot hold fails fast.
  llava_export.check_exportable(kwargs,
                                llava_export.text_target_of(tokenizer_dir))
  llava_export.check_image_token(tokenizer_dir, kwargs['image_token_id'])
  run = restore.restore_run(config, args.workdir, what='export')
  out = llava_export.export_llava(
      args.out, kwargs, run.params, tokenizer_dir=tokenizer_dir,
      image_processor_config=config.data.image_processor,
      template=config.data.template, progress=True)
  print(f'exported checkpoint {run.step} of {os.path.abspath(args.workdir)} '
        f'to {out} as LlavaForConditionalGeneration (stage '
        f"{config.get('stage', '?')}); tokenizer and processor files from "
        f'{tokenizer_dir} and {config.data.image_processor}')


def cmd_export(args: argparse.Namespace) -> None:
  if os.path.exists(args.out):
    raise FileExistsError(f'--out={args.out} exists; export writes a new '
                          'directory')
  config = (config_lib.load_config(args.config) if args.config else
            config_from_workdir(args.workdir))
  if config.get('model_name') == 'llava':
    export_llava_run(config, args)
    return
  if args.to == LLAVA_TARGET:
    raise ValueError(f'--to={LLAVA_TARGET}: the workdir is not a VLM run '
                     f"(model_name {config.get('model_name')!r}, not "
                     "'llava'); use one of " + ', '.join(hf_export.TARGETS))
  if config.init.hf_path:
    # An HF-initialised --config: its model comes from the HF directory, as
    # in training; once resolved, restore_run need not resolve it again.
    init_from_hf.resolve(config)
    config.init.hf_path = ''
  # The key tables read layer_{i} parameters (a scan run stacks them).
  decoder.require_unrolled(config, 'HF export')
  kwargs = dict(config.model.to_dict(), ffn=decoder.ffn_kwargs(config))
  # Before reading the checkpoint: a model the target cannot hold fails fast.
  hf_export.check_exportable(kwargs, args.to)
  run = restore.restore_run(config, args.workdir, what='export')
  tokenizer_dir, base = tokenizer_files(config)
  out = hf_export.export_hf(kwargs, run.params, run.router_state,
                            to=args.to, out_dir=args.out,
                            tokenizer_dir=tokenizer_dir, base_config=base)
  with open(os.path.join(out, 'config.json'), encoding='utf-8') as f:
    arch = json.load(f)['architectures'][0]
  print(f'exported checkpoint {run.step} of {os.path.abspath(args.workdir)} '
        f'to {out} as {arch}; tokenizer: ' +
        (f'copied from {tokenizer_dir}' if tokenizer_dir else
         'none (the run does not use an HF tokenizer directory)'))


# ----------------------------------------------------------------------------
# The parser.

def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog=PROG, description=__doc__.splitlines()[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest='command', required=True,
                              metavar='{tiny,inspect,import,upcycle,export}')

  p = sub.add_parser('tiny', help='write a tiny random HF model directory')
  p.add_argument('--family', choices=tiny.FAMILIES, default='llama')
  p.add_argument('--out', required=True, help='new directory to write')
  p.add_argument('--vocab_size', type=int, default=512)
  p.add_argument('--d_model', type=int, default=64)
  p.add_argument('--num_layers', type=int, default=2)
  p.add_argument('--num_heads', type=int, default=4)
  p.add_argument('--num_kv_heads', type=int, default=2)
  p.add_argument('--head_dim', type=int, default=16)
  p.add_argument('--intermediate_size', type=int, default=128)
  p.add_argument('--tie_embeddings', action='store_true')
  p.add_argument('--seed', type=int, default=0)
  p.set_defaults(run=cmd_tiny)

  p = sub.add_parser('inspect', help='describe an HF model directory and '
                     'how it imports')
  p.add_argument('--hf_dir', required=True)
  p.set_defaults(run=cmd_inspect)

  for name, text in (('import', 'an HF model as a new moe_jax run '
                      'directory (step-0 checkpoint)'),
                     ('upcycle', 'an HF dense model, upcycled to MoE, as a '
                      'new moe_jax run directory')):
    p = sub.add_parser(name, help=text)
    p.add_argument('--hf_dir', required=True)
    p.add_argument('--workdir', required=True, help='new run directory')
    p.add_argument('--config', default=None, help='config FILE[:arg] to '
                   'start from (default: the tiny CPU experiment)')
    p.set_defaults(run=cmd_import)
  p.add_argument('--router', required=True,
                 help='a key of moe_jax.moe.router.ROUTERS')
  p.add_argument('--num_experts', type=int, required=True)
  p.add_argument('--top_k', type=int, required=True)
  p.add_argument('--granularity', type=int, default=None)
  p.add_argument('--shared_experts', type=int, default=None)
  p.add_argument('--shared_mix', choices=('half', 'add'), default=None)
  p.add_argument('--noise', type=float, default=None)
  p.add_argument('--seed', type=int, default=None)
  p.add_argument('--router_seed', choices=upcycle_lib.ROUTER_SEEDS,
                 default=None)

  p = sub.add_parser('export', help="a run's newest checkpoint as an HF "
                     'model directory')
  p.add_argument('--workdir', required=True)
  p.add_argument('--to', required=True, choices=EXPORT_TARGETS)
  p.add_argument('--out', required=True, help='new directory to write')
  p.add_argument('--config', default=None, help='config FILE[:arg] of the '
                 'run (default: the workdir\'s config.json)')
  p.set_defaults(run=cmd_export)
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  """Runs one subcommand; returns the exit status (0, or 2 on an error)."""
  args = build_parser().parse_args(argv)
  try:
    args.run(args)
  except USER_ERRORS as e:
    print(f'{PROG}: error: {one_line(e)}', file=sys.stderr)
    return 2
  return 0


if __name__ == '__main__':
  sys.exit(main())
