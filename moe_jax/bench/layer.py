"""Benchmark: MoE block forward+backward per expert backend vs a dense FFN.

  python -m moe_jax.bench.layer [--tokens 128,512,4096] [--repeats 5]
      [--backends blocked loop ragged_dot] [--activation relu]

Default shape: LibMoE 154M layer (d=512, E=66, m=128, k=8, SMoE router,
float32) against the dense FFN of the same active width (k*m = 1024) and
activation, at each token count T of --tokens (4096 by default; evaluation,
decoding and expert-parallel shards run few tokens per expert). Each figure is
the median wall time of jit(grad) of the whole block (router, dispatch,
experts, combine, balance loss) after one warm-up. Every backend is timed in
alternation with the dense FFN, and its ratio is taken against the dense times
of those same rounds, so background load on a shared machine affects both
sides alike. Only `blocked` runs by default: the references `loop` (O(E)
work) and `ragged_dot` (a dense expansion on CPU) take 10-200x the dense FFN
and run with --backends. The last line is
`best_ratio=<moe/dense of the fastest backend>`, the largest such ratio over
the token counts (the worst case).

Each token count also prints a `floor` row, not a backend: every expert gets
exactly C = ceil(T*K/E) rows in one [E, C, D] batch (no router, dispatch,
combine or padding), forward plus a hand-written backward: the six batched
matmuls any XLA formulation of the layer must run, each streaming all E
experts' weights or weight gradients. Where the floor itself is above the
target ratio, no backend built from XLA ops reaches it on that machine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax
import jax.numpy as jnp

from moe_jax.moe import activations
from moe_jax.moe import experts as experts_lib
from moe_jax.moe import layer as layer_lib

# Backends whose work grows with E (loop) or that expand densely on CPU
# (ragged_dot): timed with --slow_repeats.
SLOW_BACKENDS = ('loop', 'ragged_dot')


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


def floor_grads(params: dict, xb: jax.Array, dy: jax.Array,
                activation: str) -> tuple[dict, jax.Array]:
  """Gradients of Σ dy * FFN_e(xb[e]) w.r.t. the expert weights and xb.

  The backward is written out (as blocked_gmm's custom VJP is), so XLA runs
  exactly two batched matmuls forward and four backward.

  Args:
    params: w_in [E, D, F'], w_out [E, F, D].
    xb: [E, C, D] each expert's rows.
    dy: [E, C, D] the output's cotangent.
  Returns:
    ({'w_in': [E, D, F'], 'w_out': [E, F, D]}, dx [E, C, D]).
  """
  act = lambda h: activations.apply_activation(h, activation)
  h_pre = jnp.einsum('ecd,edf->ecf', xb, params['w_in'])         # [E, C, F']
  h, act_vjp = jax.vjp(act, h_pre)                               # [E, C, F]
  dh, = act_vjp(jnp.einsum('ecd,efd->ecf', dy, params['w_out']))
  grads = {'w_out': jnp.einsum('ecf,ecd->efd', h, dy),
           'w_in': jnp.einsum('ecd,ecf->edf', xb, dh)}
  return grads, jnp.einsum('ecf,edf->ecd', dh, params['w_in'])


def _floor_fn(t: int, args):
  """jit(floor_grads) and its arguments at T = t tokens."""
  e = args.num_experts
  rows = -(-t * args.top_k // e)                                 # C
  shapes = experts_lib.ffn_param_shapes(e, args.d_model, args.expert_width,
                                        args.activation)
  keys = jax.random.split(jax.random.PRNGKey(3), 4)
  params = {name: 0.02 * jax.random.normal(key, shapes[name], jnp.float32)
            for name, key in zip(('w_in', 'w_out'), keys)}
  xb = jax.random.normal(keys[2], (e, rows, args.d_model), jnp.float32)
  dy = jax.random.normal(keys[3], (e, rows, args.d_model), jnp.float32)
  fn = jax.jit(lambda p, x, g: floor_grads(p, x, g, args.activation))
  return fn, (params, xb, dy)


def _token_counts(text: str) -> list[int]:
  counts = [int(t) for t in text.split(',') if t.strip()]
  if not counts or min(counts) < 1:
    raise argparse.ArgumentTypeError(
        f'--tokens: expected positive integers separated by commas, got '
        f'{text!r}')
  return counts


def bench_tokens(t: int, args) -> dict[str, float]:
  """Prints one row per backend at T = t tokens; returns {backend: ratio}."""
  d = args.d_model
  x = jax.random.normal(jax.random.PRNGKey(0), (1, t, d), jnp.float32)
  dense = layer_lib.DenseFFNBlock(d_model=d,
                                  width=args.top_k * args.expert_width,
                                  activation=args.activation)
  dense_fn, dense_args = _fwd_bwd(dense, dense.init(jax.random.PRNGKey(1), x),
                                  x)
  jax.block_until_ready(dense_fn(*dense_args))
  ratios = {}
  for name in args.backends:
    block = layer_lib.MoEBlock(
        d_model=d, num_experts=args.num_experts, top_k=args.top_k,
        expert_width=args.expert_width, router='smoe',
        activation=args.activation, backend=name)
    fn, fn_args = _fwd_bwd(block, block.init(jax.random.PRNGKey(2), x), x)
    slow = name in SLOW_BACKENDS
    seconds, t_dense = _time_against(
        fn, fn_args, dense_fn, dense_args,
        args.slow_repeats if slow else args.repeats)
    ratios[name] = seconds / t_dense
    print(f'{name:<12}{t:>7}{seconds:>10.4f}{t_dense:>10.4f}'
          f'{ratios[name]:>8.2f}', flush=True)
  floor_fn, floor_args = _floor_fn(t, args)
  seconds, t_dense = _time_against(floor_fn, floor_args, dense_fn, dense_args,
                                   args.repeats)
  print(f'{"floor":<12}{t:>7}{seconds:>10.4f}{t_dense:>10.4f}'
        f'{seconds / t_dense:>8.2f}', flush=True)
  return ratios


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--tokens', type=_token_counts, default=[4096],
                      help='token counts T, comma-separated (128,512,4096)')
  parser.add_argument('--d_model', type=int, default=512)
  parser.add_argument('--num_experts', type=int, default=66)
  parser.add_argument('--expert_width', type=int, default=128)
  parser.add_argument('--top_k', type=int, default=8)
  parser.add_argument('--activation', default='relu',
                      help='expert and dense FFN activation (154M LM: relu)')
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--slow_repeats', type=int, default=1,
                      help='repeats for the loop / ragged_dot backends')
  parser.add_argument('--backends', nargs='+',
                      default=['blocked'],
                      help='among blocked, loop, ragged_dot, pallas')
  args = parser.parse_args(argv)

  print(f'shape: d={args.d_model} E={args.num_experts} m={args.expert_width} '
        f'k={args.top_k} {args.activation} float32, '
        f'{jax.devices()[0].platform} x{jax.device_count()}, '
        f'forward+backward, median of runs')
  print(f'{"backend":<12}{"tokens":>7}{"seconds":>10}{"dense s":>10}'
        f'{"ratio":>8}')
  worst = 0.0
  for t in args.tokens:
    ratios = bench_tokens(t, args)
    best = min(ratios, key=ratios.get)
    print(f'fastest backend at T={t}: {best}')
    worst = max(worst, ratios[best])
  print(f'best_ratio={worst:.2f}')


if __name__ == '__main__':
  main(sys.argv[1:])
