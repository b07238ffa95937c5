"""Train-step speed of every router: median step time, tokens/s (and MFU).

  python -m moe_jax.bench.train --config=configs/smoe_154m.py:tiny

For each router (the `<router>_<size>.py` file beside the given one, same
argument), builds the model and optimiser, compiles one train step and times
`--steps` steps on a random global batch after `--warmup` untimed ones.
Printed per router: compile seconds, median step seconds, tokens/s, and on a
GPU model-FLOPs utilisation (moe_jax/flops.py; active expert FLOPs only).
The dense FLOP-matched baseline is measured in the same run as the ratio's
denominator. Last line: `slowest_ratio=` (slowest MoE step / dense step).
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import time

import flax.linen as nn
import jax
import numpy as np

from moe_jax import config_lib
from moe_jax import flops as flops_lib
from moe_jax import models
from moe_jax import sharding as sharding_lib
from moe_jax import state as state_lib
from moe_jax import train as train_lib
from moe_jax.moe import router as router_lib


def sibling_config(spec: str, router: str):
  """The config of `router` at the size (and argument) of `spec`."""
  path, _, arg = spec.partition(':')
  directory, name = os.path.split(path)
  size = name[:-3].rsplit('_', 1)[1]
  sibling = os.path.join(directory, f'{router}_{size}.py')
  return config_lib.load_config(sibling + (f':{arg}' if arg else ''))


def time_train_step(config, *, steps: int, warmup: int,
                    devices=None) -> dict:
  """{'compile_s', 'step_s' (median), 'tokens_per_s', 'mfu' (GPU)}.

  The state and batch are laid out on `config.mesh` over `devices` (default
  every device), as in training.
  """
  mesh = sharding_lib.make_mesh(config.mesh, devices)
  rules = sharding_lib.logical_rules(config.mesh)
  model = models.build(config)
  optimizer, schedule = state_lib.make_optimizer(config.train)
  settings = train_lib.StepSettings.from_config(config, model)
  init = functools.partial(state_lib.init_state, model=model,
                           optimizer=optimizer, config=config)
  key = jax.random.key(config.train.seed)
  shardings = sharding_lib.tree_shardings(jax.eval_shape(init, key), mesh,
                                          rules)
  batch_sharding = sharding_lib.batch_sharding(mesh, rules)
  shape = (config.train.global_batch, config.train.seq_len + 1)
  tokens = np.random.default_rng(0).integers(0, config.model.vocab_size, shape)
  batch = sharding_lib.global_batch(
      {'inputs': tokens[:, :-1].astype(np.int32),
       'targets': tokens[:, 1:].astype(np.int32)}, batch_sharding)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    state = jax.jit(lambda k: nn.unbox(init(k)), out_shardings=shardings)(key)
    step = jax.jit(functools.partial(
        train_lib.train_step, model=model, optimizer=optimizer,
        schedule=schedule, settings=settings),
                   in_shardings=(shardings, batch_sharding),
                   out_shardings=(shardings, sharding_lib.replicated(mesh)),
                   donate_argnums=0)
    start = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics['loss'])
    compile_s = time.perf_counter() - start
    for _ in range(warmup):
      state, metrics = step(state, batch)
    jax.block_until_ready(metrics['loss'])
    times = []
    for _ in range(steps):
      start = time.perf_counter()
      state, metrics = step(state, batch)
      jax.block_until_ready(metrics['loss'])
      times.append(time.perf_counter() - start)
  step_s = statistics.median(times)
  tokens_per_s = config.train.global_batch * config.train.seq_len / step_s
  result = {'compile_s': compile_s, 'step_s': step_s,
            'tokens_per_s': tokens_per_s}
  peak = flops_lib.peak_flops(jax.devices()[0].device_kind)
  if peak:
    result['mfu'] = (flops_lib.train_flops_per_token(config) * tokens_per_s
                     / (peak * jax.device_count()))
  return result


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--config', default='configs/smoe_154m.py:tiny',
                      help='a config file[:arg]; its siblings give the '
                      'other routers')
  parser.add_argument('--routers', default='all',
                      help="comma-separated router names, or 'all'")
  parser.add_argument('--steps', type=int, default=10)
  parser.add_argument('--warmup', type=int, default=2)
  parser.add_argument('--backend', default=None,
                      help='override moe.backend (e.g. blocked, pallas)')
  args = parser.parse_args(argv)
  routers = (list(router_lib.ROUTERS) if args.routers == 'all'
             else args.routers.split(','))
  print(f'device: {jax.devices()[0].device_kind} x {jax.device_count()}; '
        f'config {args.config}; {args.steps} timed steps (median)')
  dense = time_train_step(sibling_config(args.config, 'dense'),
                          steps=args.steps, warmup=args.warmup)
  header = (f"{'router':<18}{'compile s':>10}{'step ms':>10}{'tokens/s':>12}"
            f"{'vs dense':>10}{'MFU':>8}")
  print(header)

  def row(name, r):
    mfu = f"{100 * r['mfu']:.1f}%" if 'mfu' in r else '-'
    print(f"{name:<18}{r['compile_s']:>10.1f}{1e3 * r['step_s']:>10.2f}"
          f"{r['tokens_per_s']:>12,.0f}{r['step_s'] / dense['step_s']:>10.2f}"
          f'{mfu:>8}', flush=True)

  row('dense', dense)
  ratios = []
  for router in routers:
    config = sibling_config(args.config, router)
    if args.backend:
      config.moe.backend = args.backend
    result = time_train_step(config, steps=args.steps, warmup=args.warmup)
    row(router, result)
    ratios.append(result['step_s'] / dense['step_s'])
  print(f'slowest_ratio={max(ratios):.2f}')


if __name__ == '__main__':
  main()
