"""Trace-writing speed: seconds to write 1M token-layer rows as Parquet.

  python -m moe_jax.bench.trace

Random routing of LibMoE's 154M shape (16 layers, K = 8 of 66 experts) over
64 windows of 1024 tokens = 1,048,576 token-layer rows, written by
`moe_jax.trace.write_trace` (without the full probabilities). Prints each
repeat and the median; last line `rows_per_s=`.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import numpy as np

from moe_jax import trace as trace_lib


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--layers', type=int, default=16)
  parser.add_argument('--windows', type=int, default=64)
  parser.add_argument('--seq_len', type=int, default=1024)
  parser.add_argument('--top_k', type=int, default=8)
  parser.add_argument('--experts', type=int, default=66)
  parser.add_argument('--repeats', type=int, default=3)
  args = parser.parse_args(argv)
  rng = np.random.default_rng(0)
  per_batch = max(args.windows // 4, 1)
  batches = []
  for _ in range(args.windows // per_batch):
    rows = per_batch * args.seq_len
    layers = [{'choice': rng.integers(0, args.experts, (rows, args.top_k)),
               'weight': rng.random((rows, args.top_k), dtype=np.float32),
               'top1': rng.integers(0, args.experts, (rows,))}
              for _ in range(args.layers)]
    batches.append((rng.integers(0, 8000, (per_batch, args.seq_len)),
                    np.zeros((per_batch,), np.int32), layers))
  times = []
  with tempfile.TemporaryDirectory() as directory:
    for repeat in range(args.repeats):
      start = time.perf_counter()
      summary = trace_lib.write_trace(directory, repeat, batches)
      times.append(time.perf_counter() - start)
      print(f"repeat {repeat}: {summary['rows']:,} rows in {times[-1]:.2f} s",
            flush=True)
  median = statistics.median(times)
  print(f'median {median:.2f} s')
  print(f"rows_per_s={summary['rows'] / median:.0f}")


if __name__ == '__main__':
  main()
