"""Train-step time of the :tiny config on each mesh layout of 8 devices.

  python -m moe_jax.bench.shard [--config=configs/smoe_154m.py:tiny]

On a CPU the script asks XLA for 8 host devices (before JAX starts), so the
layouts run anywhere; on CPU the figures measure partitioning overhead, not
speed-ups (the 8 "devices" share the machine's cores). Layouts: data=8,
fsdp=8, data=2 x expert=4, fsdp=2 x expert=4, and one device for reference.
Median of --steps steps after --warmup; last line: `slowest_ratio=` (slowest
layout / one device).
"""

from __future__ import annotations

import os

_FLAG = '--xla_force_host_platform_device_count=8'
if os.environ.get('JAX_PLATFORMS', 'cpu') == 'cpu' and _FLAG not in \
    os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = f"{os.environ.get('XLA_FLAGS', '')} {_FLAG}"

# pylint: disable=g-import-not-at-top,wrong-import-position
import argparse

import jax

from moe_jax import config_lib
from moe_jax.bench import train as bench_train

LAYOUTS = {
    'one_device': None,
    'data=8': dict(data=8),
    'fsdp=8': dict(data=1, fsdp=8),
    'data=2,expert=4': dict(data=2, expert=4),
    'fsdp=2,expert=4': dict(data=1, fsdp=2, expert=4),
}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--config', default='configs/smoe_154m.py:tiny')
  parser.add_argument('--steps', type=int, default=10)
  parser.add_argument('--warmup', type=int, default=2)
  parser.add_argument('--layouts', default=';'.join(list(LAYOUTS)[1:]),
                      help='semicolon-separated layouts among: ' +
                      '; '.join(list(LAYOUTS)[1:]) + ' (one_device is '
                      'always measured first, as the baseline)')
  args = parser.parse_args(argv)
  names = ['one_device'] + [n for n in args.layouts.split(';')
                            if n != 'one_device']
  unknown = [n for n in names if n not in LAYOUTS]
  if unknown:
    raise SystemExit(f'--layouts: unknown {unknown}; expected names among '
                     f'{list(LAYOUTS)}')
  if jax.device_count() < 8:
    raise SystemExit(f'needs 8 devices, found {jax.device_count()}')
  print(f'device: {jax.devices()[0].device_kind} x {jax.device_count()}; '
        f'config {args.config}; median of {args.steps} steps')
  print(f"{'layout':<18}{'compile s':>10}{'step ms':>10}{'tokens/s':>12}"
        f"{'vs one':>8}")
  base, ratios = None, []
  for name in names:
    axes = LAYOUTS[name]
    config = config_lib.load_config(args.config)
    if axes is None:
      # One device: a mesh of one, so the step is the unpartitioned program.
      config.mesh.data = 1
      result = _time_on(config, jax.devices()[:1], args)
    else:
      for axis, size in axes.items():
        config.mesh[axis] = size
      result = _time_on(config, jax.devices()[:8], args)
    base = base or result['step_s']
    ratio = result['step_s'] / base
    if axes is not None:
      ratios.append(ratio)
    print(f"{name:<18}{result['compile_s']:>10.1f}"
          f"{1e3 * result['step_s']:>10.2f}{result['tokens_per_s']:>12,.0f}"
          f'{ratio:>8.2f}', flush=True)
  if ratios:
    print(f'slowest_ratio={max(ratios):.2f}')


def _time_on(config, devices, args):
  return bench_train.time_train_step(config, steps=args.steps,
                                     warmup=args.warmup, devices=devices)


if __name__ == '__main__':
  main()
