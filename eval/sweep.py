"""Sweep: train and zero-shot-evaluate configs x seeds, then table them.

  python -m eval.sweep \\
      --configs=configs/smoe_154m.py:tiny,configs/sigmoid_154m.py:tiny \\
      --seeds=3 --root=runs/sweep [--set=train.steps=300 ...] \\
      [--tasks=piqa,arc] [--max_examples=N] [--baseline=smoe]

Each (config, seed) trains in its own workdir ROOT/<config stem>[_<arg>]
_seed<k> (seeds 0..n-1, set as --config.train.seed):

  python -m moe_jax.main --config=C --workdir=W --config.train.seed=k
      [--config.<field>=<value> for each --set]
  python -m moe_jax.main ... (the same) --mode=eval [--config.eval.tasks=...]
      [--config.eval.max_examples=N]

Training resumes (a finished workdir logs 'nothing to train'); the eval is
skipped when W/eval/step=<final>.json exists, the final step being train.steps
(or train.halt_at_step) of the config.json that training leaves in W. So a
second invocation only does what the first did not finish. Each command's
output goes to W/sweep.log. A failed command is reported with the command and
its log, the sweep goes on with the other runs, and the exit code is 1 at the
end. The table of every evaluated run (eval.table) goes to ROOT/table/.

Library use: `run_sweep(configs, seeds, root, runner=...)`; the runner
(command, log path) -> exit code is what tests replace.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
import dataclasses
import os
import re
import subprocess
import sys
from typing import TextIO

from eval import table as table_lib
from moe_jax import run_log

# (command, log path) -> exit code; the command's output goes to the log.
Runner = Callable[[Sequence[str], str], int]
LOG_FILE = 'sweep.log'
TABLE_DIR = 'table'


def run_logged(command: Sequence[str], log_path: str) -> int:
  """Runs `command`, appending its stdout and stderr to `log_path`."""
  with open(log_path, 'a', encoding='utf-8') as log:
    log.write(f'$ {" ".join(command)}\n')
    log.flush()
    return subprocess.run(list(command), stdout=log, stderr=subprocess.STDOUT,
                          check=False).returncode


@dataclasses.dataclass(frozen=True)
class Run:
  """One (config, seed) of the sweep.

  Attributes:
    config: the config spec, 'configs/smoe_154m.py:tiny'.
    seed: its config.train.seed.
    workdir: its run directory.
  """
  config: str
  seed: int
  workdir: str

  @property
  def label(self) -> str:
    """'smoe_154m:tiny seed 1' for progress lines."""
    return f'{config_label(self.config)} seed {self.seed}'

  @property
  def log_path(self) -> str:
    return os.path.join(self.workdir, LOG_FILE)


@dataclasses.dataclass(frozen=True)
class Failure:
  """A command that failed: which run, which phase, what to look at."""
  run: Run
  phase: str          # 'training' | 'eval'
  command: tuple[str, ...]
  reason: str

  def __str__(self) -> str:
    return (f'{self.run.label} ({self.phase}): {self.reason}; command: '
            f'{" ".join(self.command)}; log: {self.run.log_path}')


def config_label(spec: str) -> str:
  """'configs/smoe_154m.py:tiny' -> 'smoe_154m:tiny'."""
  path, sep, arg = spec.partition(':')
  stem = os.path.splitext(os.path.basename(path))[0]
  return f'{stem}{sep}{arg}'


def workdir_name(spec: str, seed: int) -> str:
  """'configs/smoe_154m.py:tiny', 1 -> 'smoe_154m_tiny_seed1'."""
  path, _, arg = spec.partition(':')
  stem = os.path.splitext(os.path.basename(path))[0]
  if arg:
    stem += '_' + re.sub(r'[^A-Za-z0-9.-]+', '_', arg).strip('_')
  return f'{stem}_seed{seed}'


def split_configs(values: Sequence[str]) -> list[str]:
  """--configs values -> config specs; commas inside an arg are kept.

  'configs/a.py:preset=x,tiny,configs/b.py' -> ['configs/a.py:preset=x,tiny',
  'configs/b.py']: a piece without '.py' continues the previous spec's arg.
  """
  specs = []
  for value in values:
    for piece in value.split(','):
      piece = piece.strip()
      if not piece:
        continue
      if '.py' in piece.partition(':')[0] or not specs:
        specs.append(piece)
      else:
        specs[-1] += ',' + piece
  return specs


def override_flags(overrides: Sequence[str]) -> list[str]:
  """['train.steps=300'] -> ['--config.train.steps=300'].

  Raises:
    ValueError: an override that is not <field>=<value>.
  """
  flags = []
  for item in overrides:
    field, sep, value = item.partition('=')
    field = field.strip()
    if field.startswith('config.'):
      field = field[len('config.'):]
    if not sep or not field or not re.fullmatch(r'[A-Za-z_][\w.]*', field):
      raise ValueError(f'--set={item}: expected <field>=<value>, e.g. '
                       'train.steps=300')
    flags.append(f'--config.{field}={value}')
  return flags


def eval_flags(tasks: Sequence[str] | None,
               max_examples: int | None) -> list[str]:
  """The --mode=eval overrides: the task list and the example cap."""
  flags = []
  if tasks:
    # config.eval.tasks is a comma-separated string.
    flags.append(f'--config.eval.tasks={",".join(tasks)}')
  if max_examples is not None:
    flags.append(f'--config.eval.max_examples={max_examples}')
  return flags


def train_command(run: Run, overrides: Sequence[str]) -> list[str]:
  return [sys.executable, '-m', 'moe_jax.main', f'--config={run.config}',
          f'--workdir={run.workdir}', f'--config.train.seed={run.seed}',
          *override_flags(overrides)]


def eval_command(run: Run, overrides: Sequence[str],
                 tasks: Sequence[str] | None = None,
                 max_examples: int | None = None) -> list[str]:
  return [*train_command(run, overrides), '--mode=eval',
          *eval_flags(tasks, max_examples)]


def final_step(workdir: str) -> int | None:
  """The step training stops at, from W/config.json; None without it."""
  config = run_log.read_saved_config(workdir)
  if config is None or 'train.steps' not in config:
    return None
  steps = int(config['train.steps'])
  halt = int(config.get('train.halt_at_step') or 0)
  return halt if 0 < halt < steps else steps


def result_file(workdir: str, step: int) -> str:
  return os.path.join(workdir, 'eval', f'step={step}.json')


def plan(configs: Sequence[str], seeds: int, root: str) -> list[Run]:
  """The sweep's runs, config-major: (c0, 0), (c0, 1), ..., (c1, 0), ..."""
  runs = [Run(config=c, seed=s, workdir=os.path.join(root, workdir_name(c, s)))
          for c in configs for s in range(seeds)]
  seen = {}
  for run in runs:
    if run.workdir in seen:
      raise ValueError(f'--configs: {seen[run.workdir].config} and '
                       f'{run.config} share the workdir {run.workdir}; '
                       'list each config once')
    seen[run.workdir] = run
  return runs


def run_one(run: Run, overrides: Sequence[str], *, tasks, max_examples,
            runner: Runner, progress: Callable[[str], None]
            ) -> Failure | None:
  """Trains (resuming) and evaluates one run unless its results exist."""
  os.makedirs(run.workdir, exist_ok=True)
  command = train_command(run, overrides)
  progress('training')
  code = runner(command, run.log_path)
  if code != 0:
    return Failure(run, 'training', tuple(command), f'exit code {code}')
  step = final_step(run.workdir)
  if step is None:
    return Failure(run, 'training', tuple(command),
                   f'no {os.path.join(run.workdir, run_log.CONFIG_FILE)} '
                   'with train.steps after training')
  path = result_file(run.workdir, step)
  if os.path.exists(path):
    progress(f'eval at step {step} done before ({path}), skipped')
    return None
  command = eval_command(run, overrides, tasks, max_examples)
  progress(f'evaluating step {step}')
  code = runner(command, run.log_path)
  if code != 0:
    return Failure(run, 'eval', tuple(command), f'exit code {code}')
  if not os.path.exists(path):
    return Failure(run, 'eval', tuple(command),
                   f'exited 0 but wrote no {path}')
  return None


def run_sweep(configs: Sequence[str], seeds: int, root: str, *,
              overrides: Sequence[str] = (),
              tasks: Sequence[str] | None = None,
              max_examples: int | None = None,
              baseline: str | None = 'smoe',
              runner: Runner = run_logged,
              out: TextIO | None = None) -> dict:
  """Trains and evaluates every (config, seed), then writes ROOT/table/.

  Args:
    configs: config specs, 'configs/smoe_154m.py:tiny'.
    seeds: runs per config, with config.train.seed = 0..seeds-1.
    root: the sweep's directory (one workdir per run, and table/).
    overrides: '<field>=<value>' config overrides for every run.
    tasks: the zero-shot tasks to evaluate (None: the config's).
    max_examples: the per-task example cap (None: the config's).
    baseline: the method the table's p-values compare against.
    runner: (command, log path) -> exit code (default: a subprocess).
    out: where progress lines go (default: stdout).

  Returns:
    {'runs': the Runs, 'failures': the Failures, 'table': the table
    directory, 'markdown': its text, 'table_error': None, or why there is
    no table (no run evaluated, unreadable results)}.

  Raises:
    ValueError: a malformed override or two configs with one workdir
      (before anything runs).

  """
  out = out or sys.stdout
  override_flags(overrides)  # Bad --set values fail before anything runs.
  runs = plan(configs, seeds, root)
  failures = []

  def say(text: str) -> None:
    print(text, file=out, flush=True)

  for i, run in enumerate(runs, 1):
    prefix = f'[{i}/{len(runs)}] {run.label}'
    failure = run_one(run, overrides, tasks=tasks, max_examples=max_examples,
                      runner=runner,
                      progress=lambda text, p=prefix: say(f'{p}: {text}'))
    if failure is not None:
      failures.append(failure)
      say(f'{prefix}: FAILED: {failure}')

  failed = {f.run for f in failures}
  evaluated = [r.workdir for r in runs if r not in failed]
  table_dir, markdown, table_error = None, None, None
  if not evaluated:
    table_error = 'no run was evaluated'
  else:
    try:
      frame = table_lib.load_results(evaluated)
      summary = table_lib.summarise(frame, baseline=baseline)
      markdown = table_lib.to_markdown(summary)
      table_dir = os.path.join(root, TABLE_DIR)
      table_lib.write_outputs(summary, frame, table_dir)
    except (OSError, ValueError) as e:
      table_dir, markdown, table_error = None, None, str(e)
  if markdown is not None:
    say(f'\n{markdown}\ntable of {len(evaluated)} runs: {table_dir}')
  else:
    say(f'table: FAILED: {table_error}')
  if failures:
    say(f'{len(failures)} of {len(runs)} runs failed:')
    for failure in failures:
      say(f'  {failure}')
  return {'runs': runs, 'failures': failures, 'table': table_dir,
          'markdown': markdown, 'table_error': table_error}


class _Parser(argparse.ArgumentParser):
  """argparse whose usage errors are one line and exit 2."""

  def error(self, message):
    self.exit(2, f'{self.prog}: error: {message}\n')


def main(argv: Sequence[str] | None = None, runner: Runner = run_logged
         ) -> int:
  parser = _Parser(prog='python -m eval.sweep',
                   description=__doc__.splitlines()[0])
  parser.add_argument('--configs', action='append', required=True,
                      help='comma-separated config specs, e.g. '
                      'configs/smoe_154m.py:tiny,configs/sigmoid_154m.py:tiny')
  parser.add_argument('--seeds', type=int, default=1,
                      help='runs per config, config.train.seed = 0..n-1')
  parser.add_argument('--root', required=True,
                      help='sweep directory: one workdir per run, table/')
  parser.add_argument('--set', action='append', default=[], dest='overrides',
                      metavar='FIELD=VALUE',
                      help='config override for every run, e.g. '
                      'train.steps=300 (repeatable)')
  parser.add_argument('--tasks', default=None,
                      help='comma-separated zero-shot tasks (default: the '
                      "config's)")
  parser.add_argument('--max_examples', type=int, default=None,
                      help='examples per task (default: the config\'s)')
  parser.add_argument('--baseline', default='smoe',
                      help='method for the table\'s paired t-tests')
  args = parser.parse_args(argv)
  configs = split_configs(args.configs)
  if not configs:
    parser.error('--configs: expected at least one config spec')
  for spec in configs:
    path = spec.partition(':')[0]
    if not os.path.isfile(path):
      parser.error(f'--configs: {path} does not exist (expected '
                   'configs/<router>_<size>.py[:arg])')
  if args.seeds < 1:
    parser.error(f'--seeds: expected an integer >= 1, got {args.seeds}')
  if args.max_examples is not None and args.max_examples < 1:
    parser.error('--max_examples: expected an integer >= 1, got '
                 f'{args.max_examples}')
  tasks = None
  if args.tasks:
    tasks = [t.strip() for t in args.tasks.split(',') if t.strip()]
    unknown = [t for t in tasks if t not in table_lib.TASKS]
    if unknown:
      parser.error(f'--tasks: {unknown} unknown; expected names among '
                   f'{list(table_lib.TASKS)}')
  try:
    override_flags(args.overrides)
    plan(configs, args.seeds, args.root)
  except ValueError as e:
    parser.error(str(e))
  result = run_sweep(configs, args.seeds, args.root,
                     overrides=args.overrides, tasks=tasks,
                     max_examples=args.max_examples, baseline=args.baseline,
                     runner=runner)
  return 1 if result['failures'] or result['table_error'] else 0


if __name__ == '__main__':
  sys.exit(main())
