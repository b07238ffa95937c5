"""One-shot GPU check: `python -m moe_jax.bench.gpu_check --out=DIR`.

Runs, on the machine at hand (one H100/H200, under 8 minutes), each in its
own subprocess with its own timeout:

  kernel_tests      pytest tests/kernels -m 'gpu or not gpu': on a GPU the
                    gpu-marked tests and every kernel a test leaves at its
                    default (interpret=None) compile with Triton; the tests
                    that ask for interpret=True run the interpreter there too.
                    Pass / fail counts and the first line of each failure
                    (from pytest's JUnit XML).
  kernel_table      TFLOP/s of gmm, dlhs, tgmm, jax.lax.ragged_dot and a dense
                    [M, K] x [K, N] matmul (bf16) on kernels_pallas.bench's
                    shapes mixtral, deepseek_v3_up and deepseek_v3_down, with
                    its inputs and timer (median_seconds). It fails if a Pallas
                    kernel or the dense matmul does; ragged_dot may fail alone
                    (its dense expansion can run out of memory).
  train_<backend>   the 154M SMoE train step (configs/smoe_154m.py) with
                    moe.backend = blocked, pallas, ragged_dot: compile seconds,
                    median step, tokens/s and MFU (moe_jax.bench.train).
  memory_660m       `python -m moe_jax.bench.memory --config=configs/
                    smoe_660m.py --hbm_gb=80`: per remat policy, the analytic
                    estimate, XLA's compiled figure, whether it fits in 80 GB
                    and the fewest micro-batches that fit.

After every section DIR/gpu_check.json and DIR/gpu_check.md (tables) are
rewritten atomically, so a run cut short keeps what finished; every
subprocess's output is appended, as it runs, to DIR/gpu_check.log. Those three
files are all the check writes to DIR. A section that fails, crashes or runs
out of time is recorded with its error and the check goes on. The sections
share one time budget (--budget_s, 460 s by default): each gets its share of
the budget plus whatever earlier sections left unused. Printed per section:
its status and seconds, and the elapsed time; at the end, PASS / MISS per
target of issue 16 (gmm >= 600 and tgmm >= 450 TFLOP/s on the Mixtral-like
shape in bf16, the 154M step at >= 45 % MFU with its best backend;
performance.md §8). Exit status: 0 if every section ran (slow or missing a
target included), 1 if any failed or timed out.

  --smoke     CPU-sized: a few kernel tests, the small bench shapes in
              interpret mode, configs/smoe_154m.py:tiny, seconds per section.
  --only=S    run only the sections named (comma-separated), e.g. to rerun
              the failed ones; the others are recorded as skipped.
  --fail=S    test hook: section S (comma-separated names; also the
              MOE_GPU_CHECK_FAIL environment variable) runs a command that
              fails, in place of its own.

The parent process never touches a JAX device (a GPU client would hold most of
the GPU's memory while the sections run); the sections re-enter this module
with --child.

Dimension legend: M rows, K contraction width, N output width, G experts.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import json
import math
import os
import pathlib
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any
from xml.etree import ElementTree

import jax
import jax.numpy as jnp

from kernels_pallas import bench as kernel_bench
from kernels_pallas import gmm as gmm_lib
from moe_jax import config_lib
from moe_jax import flops as flops_lib
from moe_jax import run_log
from moe_jax.bench import train as train_bench

REPO = pathlib.Path(__file__).resolve().parents[2]
JSON_FILE = 'gpu_check.json'
MD_FILE = 'gpu_check.md'
LOG_FILE = 'gpu_check.log'
BACKENDS = ('blocked', 'pallas', 'ragged_dot')
FAIL_ENV = 'MOE_GPU_CHECK_FAIL'
# Landed separately: the memory section is skipped while it is missing.
MEMORY_MODULE = 'moe_jax.bench.memory'
# bench.memory's main returns {policy: {...}}; it runs in a subprocess of its
# own (like every section), and this driver saves that dict as JSON. (Not an
# import here: gpu_check must run while that module is missing.)
_MEMORY_DRIVER = ('import importlib, json, sys\n'
                  'memory = importlib.import_module(sys.argv[1])\n'
                  'result = memory.main(sys.argv[3:])\n'
                  'with open(sys.argv[2], "w") as f:\n'
                  '  json.dump(result, f, default=float)\n')
SELF = 'moe_jax.bench.gpu_check'

# Issue 16's targets, bf16 on one H100 (performance.md §8).
GMM_TARGET_TFLOPS = 600.0
TGMM_TARGET_TFLOPS = 450.0
MFU_TARGET = 0.45


@dataclasses.dataclass(frozen=True)
class Plan:
  """The sizes of one run: the full GPU check or the CPU smoke run."""

  budget_s: float                        # all sections together
  kernel_tests: tuple[str, ...]          # pytest arguments
  kernel_shapes: tuple[str, ...]         # kernels_pallas.bench shape names
  kernel_small: bool                     # its SMALL_SHAPES instead of SHAPES
  kernel_iters: int
  ragged_iters: int                      # ragged_dot: dense expansion, slow
  train_config: str
  train_steps: int
  train_warmup: int
  memory_args: tuple[str, ...]           # python -m moe_jax.bench.memory ...
  hbm_gb: float = 80.0                   # the memory fit's device size


FULL = Plan(
    budget_s=460.0,
    kernel_tests=('tests/kernels',),
    kernel_shapes=('mixtral', 'deepseek_v3_up', 'deepseek_v3_down'),
    kernel_small=False, kernel_iters=20, ragged_iters=3,
    train_config='configs/smoe_154m.py', train_steps=10, train_warmup=2,
    memory_args=('--config=configs/smoe_660m.py',))

SMOKE = Plan(
    budget_s=240.0,
    # No-GPU tests, one interpret-mode kernel; the gpu-marked ones skip.
    kernel_tests=('tests/kernels', '-k', 'test_group_metadata or '
                  'test_choose_tiling or (test_tgmm and empty_group)'),
    kernel_shapes=('mixtral', 'deepseek_v3_up'),
    kernel_small=True, kernel_iters=1, ragged_iters=1,
    train_config='configs/smoe_154m.py:tiny', train_steps=2, train_warmup=1,
    memory_args=('--config=configs/smoe_154m.py:tiny', '--remat=none'))

# Each section's share of the budget (sums to 1). Kernel tests compile many
# small kernels; the 660M memory analysis compiles one step per policy.
SHARES = {
    'kernel_tests': 0.26,
    'kernel_table': 0.16,
    **{f'train_{b}': 0.12 for b in BACKENDS},
    'memory_660m': 0.22,
}


@dataclasses.dataclass(frozen=True)
class Section:
  name: str
  command: list[str]
  result_file: str | None      # JSON the command writes
  skip: str | None = None      # why it does not run
  shown: str | None = None     # the command as reported, if not `command`


# ----------------------------------------------------------------------------
# Child side: one section, in its own process.

def _device_info() -> dict[str, Any]:
  return {'platform': jax.default_backend(),
          'device_kind': jax.devices()[0].device_kind,
          'device_count': jax.device_count(), 'jax': jax.__version__}


def _plain(value: Any) -> Any:
  """JSON-safe: non-finite floats become null (strict JSON has no NaN)."""
  if isinstance(value, dict):
    return {str(k): _plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_plain(v) for v in value]
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


def _write_json(path: str, obj: Any) -> None:
  run_log.write_text_atomic(
      path, json.dumps(_plain(obj), indent=1, default=float) + '\n')


def _first_line(error: BaseException) -> str:
  lines = str(error).strip().splitlines()
  return f'{type(error).__name__}: {lines[0][:200] if lines else ""}'


def _kernel_ops(lhs, rhs, grad, sizes, dtype, plan: Plan) -> dict:
  """{op: (jitted fn, args, timed runs)}: kernels_pallas.bench.timings' ops."""
  out = dtype
  return {
      'gmm': (jax.jit(lambda l, r, s: gmm_lib.gmm(
          l, r, s, preferred_element_type=out)), (lhs, rhs, sizes),
              plan.kernel_iters),
      'dlhs': (jax.jit(lambda g, r, s: gmm_lib.gmm(
          g, r, s, preferred_element_type=out, transpose_rhs=True)),
               (grad, rhs, sizes), plan.kernel_iters),
      'tgmm': (jax.jit(lambda l, g, s: gmm_lib.tgmm(
          l, g, s, preferred_element_type=out)), (lhs, grad, sizes),
               plan.kernel_iters),
      'ragged_dot': (jax.jit(jax.lax.ragged_dot), (lhs, rhs, sizes),
                     plan.ragged_iters),
      # One [M, K] x [K, N] matmul, the grouped ops' FLOPs: the denominator
      # of performance.md's grouped / dense ratios.
      'dense': (jax.jit(jnp.matmul), (lhs, rhs[0]), plan.kernel_iters),
  }


def _tiling_text(t: gmm_lib.Tiling) -> str:
  return (f'{t.block_m}x{t.block_k}x{t.block_n}/w{t.num_warps}'
          f's{t.num_stages}')


def kernel_table(plan: Plan, result_path: str) -> int:
  """TFLOP/s per op and shape, saved after every op (partial on a timeout).

  Returns:
    1 if a Pallas kernel or the dense matmul failed, else 0. ragged_dot may
    fail alone: its default GPU lowering expands densely (~G x the work and
    memory, performance.md §3.2) and can run out of memory.
  """
  dtype = jnp.bfloat16
  shapes = kernel_bench.SMALL_SHAPES if plan.kernel_small else (
      kernel_bench.SHAPES)
  by_name = {s.name: s for s in shapes}
  result = {'device': _device_info(), 'dtype': 'bfloat16',
            'iters': plan.kernel_iters, 'ragged_iters': plan.ragged_iters,
            'rows': []}
  _write_json(result_path, result)
  for name in plan.kernel_shapes:
    shape = by_name[name]
    lhs, rhs, grad, sizes = kernel_bench.make_inputs(shape, dtype)
    # Active FLOPs 2 sum(sizes) K N; sizes sum to M.
    flops = 2.0 * shape.m * shape.k * shape.n
    tiles = {op: _tiling_text(gmm_lib.choose_tiling(
        shape.m, shape.k, shape.n, dtype, num_groups=shape.groups, op=op))
             for op in ('gmm', 'tgmm')}
    row = {'shape': name, 'm': shape.m, 'k': shape.k, 'n': shape.n,
           'groups': shape.groups, 'tflops': {}, 'errors': {},
           'tiling': tiles}
    result['rows'].append(row)
    for op, (fn, args, iters) in _kernel_ops(lhs, rhs, grad, sizes, dtype,
                                             plan).items():
      start = time.perf_counter()
      try:
        seconds = kernel_bench.median_seconds(fn, *args, iters=iters)
        row['tflops'][op] = flops / seconds / 1e12
      except Exception as e:  # noqa: BLE001  (OOM of ragged_dot's expansion)
        row['tflops'][op] = None
        row['errors'][op] = _first_line(e)
      print(f'{name} {op}: {_fmt(row["tflops"][op], ".4g")} TFLOP/s '
            f'({time.perf_counter() - start:.1f} s)', flush=True)
      _write_json(result_path, result)
    del lhs, rhs, grad, sizes
  broken = [f"{r['shape']} {op}" for r in result['rows'] for op in r['errors']
            if op != 'ragged_dot']
  if broken:
    print(f"kernel_table: failed: {', '.join(broken)}", flush=True)
  return 1 if broken else 0


def train_step(plan: Plan, backend: str, result_path: str) -> None:
  """The train step of plan.train_config with moe.backend = backend."""
  config = config_lib.load_config(plan.train_config)
  config.moe.backend = backend
  result = {'device': _device_info(), 'config': plan.train_config,
            'backend': backend, 'global_batch': config.train.global_batch,
            'seq_len': config.train.seq_len, 'dtype': config.train.dtype,
            'flops_per_token': flops_lib.train_flops_per_token(config)}
  result.update(train_bench.time_train_step(
      config, steps=plan.train_steps, warmup=plan.train_warmup))
  print(json.dumps(_plain(result)), flush=True)
  _write_json(result_path, result)


def run_child(args, plan: Plan) -> int:
  if args.child == 'kernel_table':
    return kernel_table(plan, args.result)
  if args.child == 'train':
    train_step(plan, args.backend, args.result)
    return 0
  raise ValueError(f'--child: unknown section {args.child!r}')


# ----------------------------------------------------------------------------
# Parent side: run the sections, record, report.

def _failing(message: str) -> list[str]:
  """A command that prints `message` and exits with status 1."""
  return [sys.executable, '-c', f'import sys; sys.exit({message!r})']


def build_sections(plan: Plan, smoke: bool, scratch: str, fail: set[str],
                   only: set[str] | None = None) -> list[Section]:
  """The sections in run order.

  Args:
    plan: FULL or SMOKE.
    smoke: passed on to the sections.
    scratch: directory for the files the sections write.
    fail: sections that run a failing command instead (test hook).
    only: if given, the others are skipped.
  """
  py = sys.executable
  me = [py, '-m', SELF]
  smoke_arg = ['--smoke'] if smoke else []
  path = lambda name: os.path.join(scratch, name)
  sections = [Section(
      'kernel_tests',
      [py, '-m', 'pytest', '-p', 'no:xdist', '-p', 'no:cacheprovider', '-q',
       '-rfE', '-m', 'gpu or not gpu', '--durations=5',
       f'--junitxml={path("kernel_tests.xml")}', *plan.kernel_tests],
      path('kernel_tests.xml'))]
  if importlib.util.find_spec('pytest') is None:
    # The gpu extra does not install it.
    sections[0] = dataclasses.replace(sections[0], command=_failing(
        'pytest is not installed: python -m pip install pytest'))
  sections.append(Section(
      'kernel_table', me + ['--child=kernel_table',
                            f'--result={path("kernel_table.json")}']
      + smoke_arg, path('kernel_table.json')))
  for backend in BACKENDS:
    name = f'train_{backend}'
    sections.append(Section(
        name, me + ['--child=train', f'--backend={backend}',
                    f'--result={path(name + ".json")}'] + smoke_arg,
        path(name + '.json')))
  memory_found = importlib.util.find_spec(MEMORY_MODULE) is not None
  sections.append(Section(
      'memory_660m',
      [py, '-c', _MEMORY_DRIVER, MEMORY_MODULE, path('memory.json'),
       *plan.memory_args, f'--hbm_gb={plan.hbm_gb:g}'],
      path('memory.json'),
      skip=None if memory_found else f'skipped: {MEMORY_MODULE} not found',
      shown=shlex.join(['python', '-m', MEMORY_MODULE, *plan.memory_args,
                        f'--hbm_gb={plan.hbm_gb:g}'])))
  names = [s.name for s in sections]
  for flag, wanted in (('--fail', fail), ('--only', only or set())):
    if wanted - set(names):
      raise ValueError(f'{flag}: unknown sections {sorted(wanted - set(names))}'
                       f'; expected some of {names}')
  if only:
    sections = [s if s.name in only else dataclasses.replace(
        s, skip='skipped: not in --only') for s in sections]
  return [dataclasses.replace(s, skip=None, shown=None, command=_failing(
      f'gpu_check: deliberate failure of section {s.name} (--fail / '
      f'{FAIL_ENV})')) if s.name in fail else s for s in sections]


def run_command(command: list[str], log_path: str,
                timeout_s: float) -> tuple[int | None, float, str]:
  """Runs `command` in the repo root, its output appended to log_path.

  Returns:
    (exit status, or None when it ran out of time and was killed; seconds;
    the output it wrote).
  """
  env = dict(os.environ, PYTHONUNBUFFERED='1')
  with open(log_path, 'ab') as log:
    start_offset = log.tell()
    start = time.perf_counter()
    # Its own process group: a timeout kills the section and its children.
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
      rc = proc.wait(timeout=max(timeout_s, 0.1))
    except subprocess.TimeoutExpired:
      rc = None
      for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, None)):
        try:
          os.killpg(proc.pid, sig)
        except ProcessLookupError:
          break
        try:
          proc.wait(timeout=grace)
          break
        except subprocess.TimeoutExpired:
          continue
    seconds = time.perf_counter() - start
  with open(log_path, 'rb') as log:
    log.seek(start_offset)
    text = log.read().decode('utf-8', errors='replace')
  return rc, seconds, text


def _error_line(text: str) -> str:
  """The most telling line of a failed section's output: its exception."""
  lines = [l.strip() for l in text.splitlines() if l.strip()]
  for line in reversed(lines):
    if ('Error' in line or 'Exception' in line or 'failure' in line
        or line.startswith('FAILED')):
      return line[:300]
  return lines[-1][:300] if lines else '(no output)'


def parse_junit(path: str) -> dict[str, Any]:
  """Counts and failures' first lines from pytest's JUnit XML."""
  root = ElementTree.parse(path).getroot()
  suites = [root] if root.tag == 'testsuite' else list(root)
  counts = {'tests': 0, 'failures': 0, 'errors': 0, 'skipped': 0}
  failures = []
  for suite in suites:
    for key in counts:
      counts[key] += int(suite.get(key, 0))
    for case in suite.iter('testcase'):
      for kind in ('failure', 'error'):
        for node in case.findall(kind):
          message = (node.get('message') or node.text or '').strip()
          failures.append({
              'test': f"{case.get('classname')}::{case.get('name')}",
              'kind': kind,
              'message': message.splitlines()[0][:300] if message else ''})
  passed = (counts['tests'] - counts['failures'] - counts['errors']
            - counts['skipped'])
  return {'passed': passed, 'failed': counts['failures'],
          'errors': counts['errors'], 'skipped': counts['skipped'],
          'failures': failures}


def parse_progress(text: str) -> dict[str, Any] | None:
  """Counts from pytest -q's progress characters (a run cut short)."""
  marks = ''.join(line.split('[')[0].strip() for line in text.splitlines()
                  if re.fullmatch(r'[.FEsxX]+\s*(\[\s*\d+%\])?',
                                  line.strip()))
  if not marks:
    return None
  return {'passed': marks.count('.') + marks.count('X'),
          'failed': marks.count('F'), 'errors': marks.count('E'),
          'skipped': marks.count('s') + marks.count('x'), 'failures': [],
          'partial': True}


def _read_result(section: Section, text: str) -> dict | None:
  path = section.result_file
  if section.name == 'kernel_tests' and path and not os.path.exists(path):
    # No JUnit XML before pytest's end: count what the log shows.
    return parse_progress(text)
  if not path or not os.path.exists(path):
    return None
  try:
    if section.name == 'kernel_tests':
      return parse_junit(path)
    with open(path, encoding='utf-8') as f:
      return json.load(f)
  except (ValueError, ElementTree.ParseError, OSError) as e:
    return {'unreadable': _first_line(e)}


def evaluate_targets(sections: dict[str, dict]) -> list[dict[str, Any]]:
  """PASS / MISS per target; 'n/a' without a GPU measurement."""
  def verdict(value, target, platform):
    if value is None:
      return 'n/a (not measured)'
    if platform != 'gpu':
      return f'n/a (no GPU: {platform})'
    return 'PASS' if value >= target else 'MISS'

  table = (sections.get('kernel_table', {}).get('result') or {})
  platform = (table.get('device') or {}).get('platform')
  mixtral = next((r for r in table.get('rows', [])
                  if r['shape'] == 'mixtral'), {})
  targets = []
  for op, target in (('gmm', GMM_TARGET_TFLOPS),
                     ('tgmm', TGMM_TARGET_TFLOPS)):
    value = (mixtral.get('tflops') or {}).get(op)
    targets.append({'target': f'{op} TFLOP/s, Mixtral-like shape, bf16',
                    'goal': f'>= {target:g}', 'value': value,
                    'verdict': verdict(value, target, platform)})
  best, best_backend, train_platform = None, None, None
  for backend in BACKENDS:
    result = sections.get(f'train_{backend}', {}).get('result') or {}
    train_platform = train_platform or (result.get('device') or {}).get(
        'platform')
    mfu = result.get('mfu')
    if mfu is not None and (best is None or mfu > best):
      best, best_backend = mfu, backend
  targets.append({
      'target': '154M SMoE train step MFU' + (
          f' (best backend: {best_backend})' if best_backend else ''),
      'goal': f'>= {MFU_TARGET:.0%}', 'value': best,
      'verdict': verdict(best, MFU_TARGET, train_platform)})
  return targets


def _fmt(value, spec: str = '.1f') -> str:
  return '-' if value is None else format(value, spec)


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
  return (['| ' + ' | '.join(header) + ' |',
           '|' + '|'.join('---' for _ in header) + '|']
          + ['| ' + ' | '.join(r) + ' |' for r in rows] + [''])


def render_markdown(report: dict[str, Any]) -> str:
  """The report's tables (gpu_check.md)."""
  sections = report['sections']
  device = report.get('device') or {}
  lines = ['# GPU check', '',
           f"Command: `{report['command']}`  ",
           f"Started {report['started']}; elapsed {report['elapsed_s']:.0f} s "
           f"of a {report['budget_s']:.0f} s budget; "
           + ('complete' if report['complete'] else 'INCOMPLETE (running or '
              'cut short)') + '.  ',
           'Device: ' + (f"{device.get('device_kind')} x "
                         f"{device.get('device_count')} "
                         f"({device.get('platform')}), jax {device.get('jax')}"
                         if device else 'unknown') + '.', '']
  if report['smoke']:
    lines += ['Smoke run (CPU-sized shapes and config): the numbers are not '
              'measurements.', '']
  lines += ['## Sections', '']
  lines += _md_table(['section', 'status', 'seconds', 'timeout s', 'note'], [
      [name, s['status'], _fmt(s.get('seconds')),
       _fmt(s.get('timeout_s'), '.0f'),
       (s.get('error') or '').replace('|', '\\|')]
      for name, s in sections.items()])
  lines += ['## Targets', '']
  lines += _md_table(['target', 'goal', 'value', 'verdict'], [
      [t['target'], t['goal'],
       _fmt(t['value'], '.1%' if 'MFU' in t['target'] else '.1f'),
       t['verdict']] for t in report['targets']])

  tests = sections['kernel_tests'].get('result') or {}
  lines += ["## Kernel tests (pytest tests/kernels -m 'gpu or not gpu')", '']
  if 'passed' in tests:
    if tests.get('partial'):
      lines += ['Cut short: counts of the tests that finished (from the '
                'progress line).', '']
    lines += _md_table(['passed', 'failed', 'errors', 'skipped'], [[
        str(tests[k]) for k in ('passed', 'failed', 'errors', 'skipped')]])
    lines += [f"- `{f['test']}` ({f['kind']}): {f['message']}"
              for f in tests['failures']] + ([''] if tests['failures'] else [])
  else:
    lines += ['No results.', '']

  table = sections['kernel_table'].get('result') or {}
  ops = ('gmm', 'dlhs', 'tgmm', 'ragged_dot', 'dense')
  lines += ['## Kernel TFLOP/s (bf16, median; active FLOPs 2 M K N)', '']
  if table.get('rows'):
    rows = []
    for r in table['rows']:
      t = r['tflops']
      ratio = lambda op: (None if t.get(op) is None or not t.get('dense')
                          else t[op] / t['dense'])
      rows.append([r['shape'], str(r['m']), str(r['k']), str(r['n']),
                   str(r['groups'])] + [_fmt(t.get(op)) for op in ops] +
                  [_fmt(ratio('gmm'), '.2f'), _fmt(ratio('tgmm'), '.2f'),
                   f"{r['tiling']['gmm']}; {r['tiling']['tgmm']}"])
    lines += _md_table(['shape', 'M', 'K', 'N', 'G', *ops, 'gmm/dense',
                        'tgmm/dense', 'tiling (gmm; tgmm)'], rows)
    errors = [f"- {r['shape']} {op}: {e}" for r in table['rows']
              for op, e in r['errors'].items()]
    lines += errors + ([''] if errors else [])
  else:
    lines += ['No results.', '']

  lines += ['## 154M SMoE train step per backend', '']
  rows = []
  for backend in BACKENDS:
    s = sections[f'train_{backend}']
    r = s.get('result') or {}
    if 'step_s' in r:
      rows.append([backend, _fmt(r['compile_s']),
                   _fmt(1e3 * r['step_s'], '.2f'),
                   _fmt(r['tokens_per_s'], ',.0f'), _fmt(r.get('mfu'), '.1%')])
    else:
      rows.append([backend, '-', '-', '-', s['status']])
  lines += _md_table(['backend', 'compile s', 'step ms', 'tokens/s', 'MFU'],
                     rows)

  memory = sections['memory_660m']
  hbm_gb = report['hbm_gb']
  lines += [f"## Memory fit in {hbm_gb:g} GB (`{memory['command']}`)",
            '']
  result = memory.get('result') or {}
  policies = {k: v for k, v in result.items() if isinstance(v, dict)
              and 'analytic' in v}
  if policies:
    gb = lambda b: _fmt(None if b is None else b / 1e9, '.2f')
    fits = lambda b: '-' if b is None else ('yes' if b <= hbm_gb * 1e9
                                            else 'no')
    rows = []
    for policy, v in policies.items():
      analytic = v['analytic'].get('total')
      xla = (v.get('xla') or {}).get('total')
      rows.append([policy, gb(analytic), gb(xla),
                   f'{fits(analytic)} / {fits(xla)}',
                   str(v.get('fewest_grad_accum'))])
    lines += _md_table(['remat', 'analytic GB', 'XLA compiled GB',
                        'fits (analytic / XLA)',
                        'fewest grad_accum (analytic)'], rows)
  else:
    lines += [memory.get('error') or 'No results.', '']
  return '\n'.join(lines) + '\n'


def _write_report(out_dir: str, report: dict[str, Any]) -> None:
  report['targets'] = evaluate_targets(report['sections'])
  _write_json(os.path.join(out_dir, JSON_FILE), report)
  run_log.write_text_atomic(os.path.join(out_dir, MD_FILE),
                            render_markdown(report))


def run_check(out_dir: str, plan: Plan, *, smoke: bool, fail: set[str],
              only: set[str] | None, command: str) -> int:
  """Runs every section; returns the exit status (1 if any failed)."""
  os.makedirs(out_dir, exist_ok=True)
  log_path = os.path.join(out_dir, LOG_FILE)
  open(log_path, 'w').close()
  start = time.perf_counter()
  report: dict[str, Any] = {
      'command': command, 'smoke': smoke, 'budget_s': plan.budget_s,
      'hbm_gb': plan.hbm_gb,
      'started': datetime.datetime.now().isoformat(timespec='seconds'),
      'elapsed_s': 0.0, 'complete': False, 'exit_code': None, 'device': None,
      'sections': {}}
  with tempfile.TemporaryDirectory(prefix='gpu_check_') as scratch:
    sections = build_sections(plan, smoke, scratch, fail, only)
    for s in sections:
      report['sections'][s.name] = {
          'status': 'pending', 'command': s.shown or shlex.join(s.command)}
    _write_report(out_dir, report)
    # Budget shares of the sections that run, normalised to sum to 1.
    shares = {s.name: SHARES[s.name] for s in sections if not s.skip}
    shares = {n: v / sum(shares.values()) for n, v in shares.items()}
    for i, section in enumerate(sections):
      record = report['sections'][section.name]
      elapsed = time.perf_counter() - start
      # This section's share plus whatever earlier ones left unused.
      later = sum(shares.get(s.name, 0.0) for s in sections[i + 1:])
      timeout_s = plan.budget_s * (1 - later) - elapsed
      if section.skip:
        record.update(status='skipped', error=section.skip)
      elif timeout_s < 1:
        record.update(status='timeout', error='not started: time budget spent')
      else:
        record.update(status='running', timeout_s=timeout_s)
        _write_report(out_dir, report)
        with open(log_path, 'a', encoding='utf-8') as log:
          log.write(f'\n===== {section.name} (timeout {timeout_s:.0f} s): '
                    f'{record["command"]}\n')
        rc, seconds, text = run_command(section.command, log_path, timeout_s)
        result = _read_result(section, text)
        record.update(seconds=seconds, returncode=rc, result=result,
                      log_tail=text[-3000:])
        if rc is None:
          record.update(status='timeout',
                        error=f'timed out after {seconds:.1f} s')
        elif rc != 0:
          tests = result if section.name == 'kernel_tests' else None
          record.update(status='failed', error=(
              f"{tests['failed']} failed, {tests['errors']} errors"
              if tests and 'failed' in tests else _error_line(text)))
        else:
          record['status'] = 'ok'
        if report['device'] is None and isinstance(result, dict):
          report['device'] = result.get('device')
      report['elapsed_s'] = time.perf_counter() - start
      _write_report(out_dir, report)
      print(f"[gpu_check {report['elapsed_s']:6.1f} s] {section.name}: "
            f"{record['status']}" + (f" in {record['seconds']:.1f} s"
                                     if 'seconds' in record else '')
            + (f" ({record['error']})" if record.get('error') else ''),
            flush=True)
  bad = [n for n, s in report['sections'].items()
         if s['status'] in ('failed', 'timeout')]
  report.update(complete=True, exit_code=1 if bad else 0,
                elapsed_s=time.perf_counter() - start)
  _write_report(out_dir, report)
  print(f"\ntargets ({'smoke run, ' if smoke else ''}see {out_dir}/{MD_FILE}):")
  for t in report['targets']:
    value = t['value']
    shown = '-' if value is None else (
        f'{value:.1%}' if 'MFU' in t['target'] else f'{value:.1f}')
    print(f"  {t['verdict']:<22} {t['target']}: {shown} (goal {t['goal']})")
  counts = {}
  for record in report['sections'].values():
    counts[record['status']] = counts.get(record['status'], 0) + 1
  print('gpu_check: ' + ', '.join(f'{n} {k}' for k, n in counts.items())
        + (f"; failed or timed out: {', '.join(bad)}" if bad else '')
        + f"; {report['elapsed_s']:.0f} s; exit {report['exit_code']}")
  return report['exit_code']


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--out', help='directory for gpu_check.json / .md / '
                      '.log (created)')
  parser.add_argument('--smoke', action='store_true',
                      help='CPU-sized run (tests and interpret mode)')
  parser.add_argument('--budget_s', type=float, default=0,
                      help='time for all sections (default: 460 s; smoke 240)')
  parser.add_argument('--only', default='',
                      help='comma-separated sections to run (default: all)')
  parser.add_argument('--fail', default=os.environ.get(FAIL_ENV, ''),
                      help='test hook: comma-separated sections that fail')
  # Internal: one section in this process (the parent starts these).
  parser.add_argument('--child', help=argparse.SUPPRESS)
  parser.add_argument('--result', help=argparse.SUPPRESS)
  parser.add_argument('--backend', help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  plan = SMOKE if args.smoke else FULL
  if args.budget_s:
    plan = dataclasses.replace(plan, budget_s=args.budget_s)
  if args.child:
    return run_child(args, plan)
  if not args.out:
    parser.error('--out is required')
  command = shlex.join(['python', '-m', 'moe_jax.bench.gpu_check',
                        *(sys.argv[1:] if argv is None else argv)])
  names = lambda text: set(filter(None, text.split(',')))
  return run_check(args.out, plan, smoke=args.smoke, fail=names(args.fail),
                   only=names(args.only) or None, command=command)


if __name__ == '__main__':
  sys.exit(main())
