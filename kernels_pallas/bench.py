"""Grouped-matmul benchmark: `python -m kernels_pallas.bench`.

On a GPU: for each shape, the median TFLOP/s of gmm, dlhs (gmm with rhs^T),
tgmm, jax.lax.ragged_dot and a dense [M, K] x [K, N] matmul of the same FLOPs,
and the ratios to dense (performance.md §8: active FLOPs
2 * sum(sizes) * K * N, bf16 in and out). A correctness check of the compiled
kernels on small shapes runs first.

Without a GPU it runs that correctness check in Pallas interpret mode, on small
versions of the same shapes (max abs error against the loop reference and
against ragged_dot), and says that timings need a GPU.

Dimension legend: M rows, K contraction width, N output width, G experts.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from kernels_pallas import gmm as gmm_lib


@dataclasses.dataclass(frozen=True)
class Shape:
  name: str
  m: int        # routed rows (tokens x top-k)
  k: int
  n: int
  groups: int
  routing: str  # 'balanced' | 'random' (multinomial, as tokamax's defaults)


# performance.md §2 and §8: Mixtral, DeepSeek-V3 (d 7168, expert width 2048,
# 256 experts; up and down projections), Qwen3-30B-A3B, LibMoE 154M / 660M.
SHAPES = (
    Shape('mixtral', 8192, 4096, 14336, 8, 'balanced'),
    Shape('deepseek_v3_up', 131072, 7168, 2048, 256, 'random'),
    Shape('deepseek_v3_down', 131072, 2048, 7168, 256, 'random'),
    Shape('qwen3_30b_up', 131072, 2048, 768, 128, 'random'),
    Shape('libmoe_154m', 131072, 512, 128, 66, 'random'),
    Shape('libmoe_660m', 131072, 1024, 256, 66, 'random'),
)

# Small versions for the correctness check (interpret mode on CPU): the same
# group counts where affordable, odd widths, a few rows per group.
SMALL_SHAPES = (
    Shape('mixtral', 256, 64, 224, 8, 'balanced'),
    Shape('deepseek_v3_up', 384, 112, 32, 32, 'random'),
    Shape('deepseek_v3_down', 384, 32, 112, 32, 'random'),
    Shape('qwen3_30b_up', 300, 32, 12, 16, 'random'),
    Shape('libmoe_154m', 528, 32, 8, 66, 'random'),
)


def group_sizes(shape: Shape, seed: int = 0) -> np.ndarray:
  """[G] int32 rows per expert summing to M."""
  if shape.routing == 'balanced':
    sizes = np.full(shape.groups, shape.m // shape.groups)
    sizes[: shape.m % shape.groups] += 1
  else:
    rng = np.random.default_rng(seed)
    sizes = rng.multinomial(shape.m, np.full(shape.groups, 1 / shape.groups))
  return sizes.astype(np.int32)


def make_inputs(shape: Shape, dtype, seed: int = 0):
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
  lhs = (jax.random.normal(k1, (shape.m, shape.k)) / np.sqrt(shape.k))
  rhs = jax.random.normal(k2, (shape.groups, shape.k, shape.n))
  grad = jax.random.normal(k3, (shape.m, shape.n))
  sizes = jnp.asarray(group_sizes(shape, seed))
  return lhs.astype(dtype), rhs.astype(dtype), grad.astype(dtype), sizes


def check(shapes, dtype, interpret: bool) -> float:
  """Prints max abs errors of the kernels; returns the largest."""
  print(f'correctness ({"interpret mode" if interpret else "compiled"}, '
        f'{jnp.dtype(dtype).name} inputs, float32 outputs): max abs error vs '
        'loop reference / vs ragged_dot')
  worst = 0.0
  f32 = jnp.float32
  for shape in shapes:
    lhs, rhs, grad, sizes = make_inputs(shape, dtype)
    t0 = time.perf_counter()
    out = gmm_lib.gmm(lhs, rhs, sizes, interpret=interpret)
    dlhs = gmm_lib.gmm(grad, rhs, sizes, interpret=interpret,
                       transpose_rhs=True)
    drhs = gmm_lib.tgmm(lhs, grad, sizes, interpret=interpret)
    jax.block_until_ready((out, dlhs, drhs))
    seconds = time.perf_counter() - t0
    dims = jax.lax.RaggedDotDimensionNumbers(
        dot_dimension_numbers=(((0,), (0,)), ((), ())),
        lhs_ragged_dimensions=[0], rhs_group_dimensions=[])
    pairs = {
        'gmm': (out, gmm_lib.gmm_reference(lhs, rhs, sizes),
                jax.lax.ragged_dot(lhs, rhs, sizes,
                                   preferred_element_type=f32)),
        'dlhs': (dlhs,
                 gmm_lib.gmm_reference(grad, rhs, sizes, transpose_rhs=True),
                 jax.lax.ragged_dot(grad, jnp.swapaxes(rhs, 1, 2), sizes,
                                    preferred_element_type=f32)),
        'tgmm': (drhs, gmm_lib.tgmm_reference(lhs, grad, sizes),
                 jax.lax.ragged_dot_general(lhs, grad, sizes, dims,
                                            preferred_element_type=f32)),
    }
    errs = []
    for op, (got, ref, rd) in pairs.items():
      e_ref = float(jnp.max(jnp.abs(got - ref)))
      e_rd = float(jnp.max(jnp.abs(got - rd)))
      worst = max(worst, e_ref, e_rd)
      errs.append(f'{op} {e_ref:.1e} / {e_rd:.1e}')
    print(f'  {shape.name:17s} M={shape.m:<6d} K={shape.k:<5d} N={shape.n:<5d}'
          f' G={shape.groups:<4d} ' + '  '.join(errs) + f'  ({seconds:.1f}s)')
  return worst


def median_seconds(fn: Callable, *args, iters: int) -> float:
  jax.block_until_ready(fn(*args))  # compile and warm up
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def timings(shapes, dtype, iters: int, ragged_iters: int) -> None:
  """Prints the TFLOP/s table (GPU)."""
  print(f'\ndevice: {jax.devices()[0].device_kind}; jax {jax.__version__}; '
        f'{jnp.dtype(dtype).name}; median of {iters} runs; TFLOP/s of active '
        'FLOPs 2*sum(sizes)*K*N')
  cols = ('gmm', 'dlhs', 'tgmm', 'ragged_dot', 'dense', 'gmm/dense',
          'tgmm/dense')
  print(f'{"shape":17s} {"M":>7s} {"K":>6s} {"N":>6s} {"G":>4s} ' +
        ' '.join(f'{c:>10s}' for c in cols) + '  tiling (gmm; tgmm)')
  for shape in shapes:
    lhs, rhs, grad, sizes = make_inputs(shape, dtype)
    flops = 2.0 * float(jnp.sum(sizes)) * shape.k * shape.n
    fns = {
        'gmm': jax.jit(lambda l, r, s: gmm_lib.gmm(
            l, r, s, preferred_element_type=dtype)),
        'dlhs': jax.jit(lambda g, r, s: gmm_lib.gmm(
            g, r, s, preferred_element_type=dtype, transpose_rhs=True)),
        'tgmm': jax.jit(lambda l, g, s: gmm_lib.tgmm(
            l, g, s, preferred_element_type=dtype)),
        'ragged_dot': jax.jit(lambda l, r, s: jax.lax.ragged_dot(l, r, s)),
    }
    args = {'gmm': (lhs, rhs, sizes), 'dlhs': (grad, rhs, sizes),
            'tgmm': (lhs, grad, sizes), 'ragged_dot': (lhs, rhs, sizes)}
    tflops = {}
    for name, fn in fns.items():
      try:
        n_iter = ragged_iters if name == 'ragged_dot' else iters
        tflops[name] = flops / median_seconds(fn, *args[name],
                                              iters=n_iter) / 1e12
      except Exception as e:  # noqa: BLE001  (OOM of the dense expansion)
        tflops[name] = float('nan')
        print(f'  {shape.name} {name}: failed ({type(e).__name__}: '
              f'{str(e).splitlines()[0][:120]})')
    w = rhs[0]
    tflops['dense'] = 2.0 * shape.m * shape.k * shape.n / median_seconds(
        jax.jit(jnp.matmul), lhs, w, iters=iters) / 1e12
    tflops['gmm/dense'] = tflops['gmm'] / tflops['dense']
    tflops['tgmm/dense'] = tflops['tgmm'] / tflops['dense']
    t_gmm = gmm_lib.choose_tiling(shape.m, shape.k, shape.n, dtype,
                                  num_groups=shape.groups)
    t_tgmm = gmm_lib.choose_tiling(shape.m, shape.k, shape.n, dtype,
                                   num_groups=shape.groups, op='tgmm')
    tile = lambda t: (f'{t.block_m}x{t.block_k}x{t.block_n}/w{t.num_warps}'
                      f's{t.num_stages}')
    print(f'{shape.name:17s} {shape.m:7d} {shape.k:6d} {shape.n:6d} '
          f'{shape.groups:4d} ' +
          ' '.join(f'{tflops[c]:10.2f}' if '/' in c else f'{tflops[c]:10.1f}'
                   for c in cols) + f'  {tile(t_gmm)}; {tile(t_tgmm)}')
    del lhs, rhs, grad


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--shapes', default='',
                      help='comma-separated shape names (default: all)')
  parser.add_argument('--dtype', default='bfloat16')
  parser.add_argument('--iters', type=int, default=20)
  parser.add_argument('--ragged_iters', type=int, default=3,
                      help='runs of ragged_dot (slow dense expansion on GPU)')
  args = parser.parse_args(argv)
  dtype = jnp.dtype(args.dtype)
  wanted = set(filter(None, args.shapes.split(',')))
  pick = lambda shapes: [s for s in shapes if not wanted or s.name in wanted]
  on_gpu = jax.default_backend() == 'gpu'
  worst = check(pick(SMALL_SHAPES), dtype, interpret=not on_gpu)
  # float32 accumulation of O(1) terms: errors are ~1e-5 unless a tile is wrong.
  ok = worst < 1e-3
  print(f'correctness: {"ok" if ok else "FAILED"} (largest error {worst:.1e})')
  if not on_gpu:
    print(f'\nno GPU (JAX backend {jax.default_backend()!r}): TFLOP/s timings '
          'need a GPU; run `python -m kernels_pallas.bench` on an H100.')
    return 0 if ok else 1
  timings(pick(SHAPES), dtype, args.iters, args.ragged_iters)
  return 0 if ok else 1


if __name__ == '__main__':
  sys.exit(main())
