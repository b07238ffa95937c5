"""Benchmark: Hugging Face import and export of a Llama-shaped model.

  python -m moe_jax.bench.convert [--params=1e9] [--repeats=3]
                                  [--dtype=bfloat16|float32]

Writes a random Llama-shaped checkpoint of about `--params` parameters into a
temporary directory with safetensors_io (no torch): vocabulary 32000, head
width 64, 4 query heads per kv head (GQA), MLP width 2.75 D, the widest D of
a ladder that still leaves L >= D / 128 layers (1e9: D 2048, L 19,
I 5632: 988M parameters), stored as `--dtype` (bfloat16 by default, as
published checkpoints are). Then times, each in a fresh process:

  import  hf_import.import_hf: every tensor read, cast to float32 and laid
          out as flax parameters (jax arrays)
  export  hf_export.export_hf(to='dense'), after an untimed import: float32
          safetensors (export's only dtype) in 5 GiB shards, fsynced

Printed per phase: the median seconds over `--repeats` processes, and the
peak resident memory of those processes (VmHWM; ru_maxrss where there is no
/proc), beside their resident memory before the phase began (Python, jax
and the libraries). The source
files are read from the page cache after the first pass (warm). The last
lines are `key=value` figures for scripts.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import ml_dtypes
import numpy as np

from moe_jax.convert import families
from moe_jax.convert import hf_export
from moe_jax.convert import hf_import
from moe_jax.convert import safetensors_io
from moe_jax.convert import tiny

VOCAB = 32000
HEAD_DIM = 64
# Query heads per kv head.
GQA = 4
WIDTHS = (256, 512, 768, 1024, 1536, 2048, 2560, 3072, 4096, 5120, 8192)
DTYPES = {'bfloat16': ml_dtypes.bfloat16, 'float32': np.float32}


def llama_shape(params: float) -> dict[str, int]:
  """{'V', 'D', 'L', 'H', 'K', 'I', 'params'} of about `params` parameters."""
  best = None
  for d in WIDTHS:
    heads = d // HEAD_DIM
    kv = max(1, heads // GQA)
    width = 256 * round(2.75 * d / 256)
    per_layer = (2 * d * d + 2 * d * kv * HEAD_DIM + 3 * d * width + 2 * d)
    embed = 2 * VOCAB * d + d
    layers = round((params - embed) / per_layer)
    if best is None or layers >= max(2, d // 128):
      layers = max(layers, 2)
      best = dict(V=VOCAB, D=d, L=layers, H=heads, K=kv, I=width,
                  params=embed + layers * per_layer)
  return best


def write_checkpoint(directory: str, shape: dict[str, int], dtype: str,
                     seed: int = 0) -> int:
  """A random Llama checkpoint (config.json + safetensors); returns bytes."""
  hf = tiny.hf_config('llama', vocab_size=shape['V'], d_model=shape['D'],
                      num_layers=shape['L'], num_heads=shape['H'],
                      num_kv_heads=shape['K'], head_dim=HEAD_DIM,
                      intermediate_size=shape['I'],
                      max_position_embeddings=4096, rope_theta=10000.0,
                      norm_eps=1e-5, tie_embeddings=False)
  shapes = {}
  for item in families.key_table(hf, 'llama'):
    shapes.update(zip(item.hf_keys, item.shapes))
  rng = np.random.default_rng(seed)
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, 'config.json'), 'w') as f:
    json.dump(hf, f, indent=2)
  size = 0
  with safetensors_io.ShardedWriter(directory) as writer:
    for key, tensor_shape in shapes.items():
      values = rng.standard_normal(tensor_shape, np.float32)
      values *= 0.02
      array = values.astype(DTYPES[dtype])
      del values
      size += array.nbytes
      writer.add(key, array)
  return size


def _memory() -> tuple[int, int]:
  """(resident bytes now, peak resident bytes) of this process.

  /proc/self/status's VmRSS / VmHWM where there is one: ru_maxrss would
  also count the parent's memory at fork (Linux keeps it across exec).
  """
  try:
    with open('/proc/self/status', encoding='ascii') as f:
      fields = dict(line.split(':', 1) for line in f if ':' in line)
    return (int(fields['VmRSS'].split()[0]) * 1024,
            int(fields['VmHWM'].split()[0]) * 1024)
  except (OSError, KeyError, ValueError):
    # macOS reports ru_maxrss in bytes, Linux in KiB.
    scale = 1 if sys.platform == 'darwin' else 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
    return peak, peak


def run_phase(phase: str, hf_dir: str, out_dir: str) -> dict[str, float]:
  """One timed phase in this process: {'seconds', 'start_rss', 'peak_rss'}."""
  start_rss, _ = _memory()
  start = time.perf_counter()
  _, params, kwargs = hf_import.import_hf(hf_dir, progress=False)
  jax.block_until_ready(params)
  if phase == 'export':
    start = time.perf_counter()
    hf_export.export_hf(kwargs, params, {}, to='dense', out_dir=out_dir,
                        progress=False)
  seconds = time.perf_counter() - start
  return {'seconds': seconds, 'start_rss': start_rss,
          'peak_rss': _memory()[1]}


def _child(phase: str, hf_dir: str, out_dir: str) -> dict[str, float]:
  """run_phase in a fresh process: its peak memory is that phase's alone."""
  repo = os.path.dirname(os.path.dirname(os.path.dirname(
      os.path.abspath(__file__))))
  env = dict(os.environ)
  env['PYTHONPATH'] = os.pathsep.join(
      p for p in (repo, env.get('PYTHONPATH')) if p)
  done = subprocess.run(
      [sys.executable, '-m', 'moe_jax.bench.convert', f'--phase={phase}',
       f'--hf_dir={hf_dir}', f'--out={out_dir}'],
      capture_output=True, text=True, env=env, check=False)
  if done.returncode:
    raise RuntimeError(f'the {phase} process failed ({done.returncode}):\n'
                       f'{done.stderr[-3000:]}')
  return json.loads(done.stdout.strip().splitlines()[-1])


def _gib(num_bytes: float) -> str:
  return f'{num_bytes / 2**30:.2f} GiB'


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--params', type=float, default=1e9,
                      help='target parameter count (e.g. 1e9, 2e7)')
  parser.add_argument('--repeats', type=int, default=3,
                      help='timed processes per phase (median)')
  parser.add_argument('--dtype', choices=sorted(DTYPES), default='bfloat16',
                      help='dtype of the source checkpoint on disk')
  parser.add_argument('--tmp_dir', default=None,
                      help='where the temporary directory goes')
  # Internal: one phase in a child process (see _child).
  parser.add_argument('--phase', choices=('import', 'export'),
                      help=argparse.SUPPRESS)
  parser.add_argument('--hf_dir', help=argparse.SUPPRESS)
  parser.add_argument('--out', help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.phase:
    print(json.dumps(run_phase(args.phase, args.hf_dir, args.out)))
    return

  shape = llama_shape(args.params)
  print(f"model: Llama D={shape['D']} L={shape['L']} H={shape['H']} "
        f"K={shape['K']} I={shape['I']} V={shape['V']}: "
        f"{shape['params']:,} parameters", flush=True)
  root = tempfile.mkdtemp(prefix='moe_jax_bench_convert-', dir=args.tmp_dir)
  try:
    source, out = os.path.join(root, 'hf'), os.path.join(root, 'out')
    start = time.perf_counter()
    size = write_checkpoint(source, shape, args.dtype)
    print(f'write: {time.perf_counter() - start:.1f} s for {_gib(size)} of '
          f'{args.dtype} safetensors (random, numpy)', flush=True)
    figures = {}
    for phase in ('import', 'export'):
      runs = []
      for _ in range(args.repeats):
        runs.append(_child(phase, source, out))
        shutil.rmtree(out, ignore_errors=True)
      seconds = statistics.median(r['seconds'] for r in runs)
      peak = max(r['peak_rss'] for r in runs)
      start_rss = max(r['start_rss'] for r in runs)
      figures[phase] = (seconds, peak)
      what = ('float32 params' if phase == 'import' else
              f"{_gib(4 * shape['params'])} float32")
      each = ', '.join(f"{r['seconds']:.2f}" for r in runs)
      print(f'{phase}: {seconds:.2f} s median of {args.repeats} ({each}) -> '
            f'{what}; peak RSS {_gib(peak)} (before the phase '
            f'{_gib(start_rss)})', flush=True)
  finally:
    shutil.rmtree(root, ignore_errors=True)
  params_per_s = shape['params'] / figures['import'][0]
  print(f"params={shape['params']}")
  print(f"import_s={figures['import'][0]:.3f}")
  print(f"import_peak_rss_mib={figures['import'][1] / 2**20:.0f}")
  print(f"export_s={figures['export'][0]:.3f}")
  print(f"export_peak_rss_mib={figures['export'][1] / 2**20:.0f}")
  print(f'import_params_per_s={params_per_s:.3g}')


if __name__ == '__main__':
  main()
