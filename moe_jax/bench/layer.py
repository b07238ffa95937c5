"""Benchmark: MoE block forward+backward per expert backend vs a dense FFN.

  python -m moe_jax.bench.layer [--tokens 4096] [--repeats 5] [--backends ...]

Default shape: LibMoE 154M layer (d=512, E=66, m=128, k=8, SMoE router,
float32) on 4096 tokens, against the dense ReLU FFN of the same active width
(k*m = 1024). Each figure is the median wall time of jit(grad) of the whole
block (router, dispatch, experts, combine, balance loss) after one warm-up.
Every backend is timed in alternation with the dense FFN, and its ratio is
taken against the dense times of those same rounds, so background load on a
shared machine affects both sides alike. The last line is
`best_ratio=<moe/dense of the fastest backend>`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax
import jax.numpy as jnp

from moe_jax.moe import layer as layer_lib


def _once(fn, args) -> float:
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - start


def _time_against(fn, args, base_fn, base_args, repeats: int):
  """Median seconds of fn and of base_fn, timed in alternating rounds."""
  jax.block_until_ready(fn(*args))   # compile + warm-up
  times, base_times = [], []
  for _ in range(repeats):
    base_times.append(_once(base_fn, base_args))
    times.append(_once(fn, args))
  return statistics.median(times), statistics.median(base_times)


def _fwd_bwd(module, variables, x):
  """jit(grad) of sum(y) + Σ aux losses w.r.t. params and x."""
  def loss(params, x):
    y, aux = module.apply({**variables, 'params': params}, x)
    return jnp.sum(y) + sum(aux['losses'].values())
  return jax.jit(jax.grad(loss, argnums=(0, 1))), (variables['params'], x)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--tokens', type=int, default=4096)
  parser.add_argument('--d_model', type=int, default=512)
  parser.add_argument('--num_experts', type=int, default=66)
  parser.add_argument('--expert_width', type=int, default=128)
  parser.add_argument('--top_k', type=int, default=8)
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--slow_repeats', type=int, default=1,
                      help='repeats for the loop / ragged_dot backends')
  parser.add_argument('--backends', nargs='+',
                      default=['blocked', 'loop', 'ragged_dot'])
  args = parser.parse_args(argv)

  d, t = args.d_model, args.tokens
  x = jax.random.normal(jax.random.PRNGKey(0), (1, t, d), jnp.float32)
  dense = layer_lib.DenseFFNBlock(d_model=d, width=args.top_k * args.expert_width)
  dense_fn, dense_args = _fwd_bwd(dense, dense.init(jax.random.PRNGKey(1), x),
                                  x)
  jax.block_until_ready(dense_fn(*dense_args))
  print(f'shape: T={t} d={d} E={args.num_experts} m={args.expert_width} '
        f'k={args.top_k} float32, {jax.devices()[0].platform} '
        f'x{jax.device_count()}, forward+backward, median of runs')
  print(f'{"backend":<12}{"seconds":>10}{"dense s":>10}{"ratio":>8}')
  ratios = {}
  for name in args.backends:
    block = layer_lib.MoEBlock(
        d_model=d, num_experts=args.num_experts, top_k=args.top_k,
        expert_width=args.expert_width, router='smoe', backend=name)
    fn, fn_args = _fwd_bwd(block, block.init(jax.random.PRNGKey(2), x), x)
    slow = name in ('loop', 'ragged_dot')
    seconds, t_dense = _time_against(
        fn, fn_args, dense_fn, dense_args,
        args.slow_repeats if slow else args.repeats)
    ratios[name] = seconds / t_dense
    print(f'{name:<12}{seconds:>10.4f}{t_dense:>10.4f}{ratios[name]:>8.2f}',
          flush=True)
  best = min(ratios, key=ratios.get)
  print(f'fastest backend: {best}')
  print(f'best_ratio={ratios[best]:.2f}')


if __name__ == '__main__':
  main(sys.argv[1:])
