"""Zero-shot evaluation of a checkpoint: validation PPL and LibMoE's tasks.

  python -m moe_jax.main --config=configs/smoe_154m.py --workdir=W --mode=eval \
      [--config.eval.tasks=piqa,arc] [--config.eval.max_examples=100] \
      [--config.eval.step=N | --config.eval.select=best_zero_shot]

scores one checkpoint of W and writes W/eval/step=<N>.json (the format of
`record`, read by eval/table.py) and W/eval/step=<N>.md, atomically. The
tasks, their prompts and LibMoE's scoring rules are in eval/tasks/; the
scorer is moe_jax/loglikelihood.py behind eval/text_scorer.py.

A Hugging Face model directory is scored the same way, imported to JAX with
its own tokenizer (no PPL: it has no validation set here):

  python -m eval.zero_shot --hf=DIR --data_dir=../shared/data/lm_eval \
      --tasks=piqa,arc --out=DIR/eval
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
import time
from typing import Any, Sequence

from absl import logging
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np

from eval import tasks as tasks_lib
from eval import text_scorer as text_scorer_lib
from moe_jax import restore
from moe_jax import run_log
from moe_jax import scoring
from moe_jax.data import from_config

FORMAT = 'moe_jax.zero_shot/1'
RESULT_DIR = 'eval'
# Values of config.eval.select.
SELECTIONS = ('newest', 'best_loss', 'best_zero_shot')
# The metrics.jsonl split of the quick zero-shot evaluation in training;
# its records hold each task's score and 'average'.
SPLIT = 'zero_shot'


def check_data(names: Sequence[str], data_root: str) -> None:
  """Fails before anything is scored when a task's folder is missing."""
  missing = [os.path.join(data_root, tasks_lib.TASKS[n].subdir)
             for n in names
             if not os.path.isdir(os.path.join(data_root,
                                               tasks_lib.TASKS[n].subdir))]
  if missing:
    raise FileNotFoundError(
        f'config.eval.data_dir={data_root!r}: no folder for task(s) '
        f'{", ".join(missing)}; expected one folder per task in the layout '
        'of ../shared/data/lm_eval (README: "Zero-shot evaluation"), or '
        'fewer tasks in config.eval.tasks')


def evaluate_tasks(scorer, names: Sequence[str], data_root: str, *,
                   max_examples: int | None = None) -> dict[str, dict]:
  """{task: its results entry} for each task name, in the order given."""
  check_data(names, data_root)
  out = {}
  for name in names:
    started = time.perf_counter()
    out[name] = tasks_lib.run_task(name, scorer, data_root,
                                   max_examples=max_examples or None)
    out[name]['seconds'] = round(time.perf_counter() - started, 2)
    logging.info('%s: %.2f%% (%d items, %.1f s)',
                 tasks_lib.TASKS[name].display, 100 * out[name]['score'],
                 out[name]['count'], out[name]['seconds'])
  return out


def average(task_results: dict[str, dict]) -> float:
  """AVG of the paper: the unweighted mean of the task scores."""
  return float(np.mean([r['score'] for r in task_results.values()]))


def select_step(config: ml_collections.ConfigDict, workdir: str,
                steps: Sequence[int]) -> int:
  """The checkpoint config.eval.step / config.eval.select names.

  Args:
    steps: the workdir's checkpoint steps.
  """
  if not steps:
    raise FileNotFoundError(f'{workdir}: no checkpoint to evaluate; train '
                            'first (--mode=train)')
  if config.eval.step >= 0:
    if config.eval.step not in steps:
      raise ValueError(f'config.eval.step={config.eval.step}: no such '
                       f'checkpoint in {workdir}; have {list(steps)}')
    return config.eval.step
  select = config.eval.select
  if select not in SELECTIONS:
    raise ValueError(f'config.eval.select={select!r}: expected one of '
                     f'{SELECTIONS}')
  if select == 'newest':
    return max(steps)
  split, key, sign = (('valid', 'loss', -1.0) if select == 'best_loss' else
                      (SPLIT, 'average', 1.0))
  scored = {r['step']: sign * r[key] for r in run_log.read_records(workdir)
            if r.get('split') == split and key in r and r['step'] in steps}
  if not scored:
    hint = ('train.eval_every' if select == 'best_loss' else
            'train.eval_tasks_every')
    raise ValueError(
        f'config.eval.select={select!r}: metrics.jsonl of {workdir} has no '
        f'{split!r} {key!r} record at a kept checkpoint ({list(steps)}); set {hint} '
        'to a multiple of train.checkpoint_every when training, or select '
        "'newest'")
  return max(scored, key=scored.get)


def validation(config: ml_collections.ConfigDict, workdir: str,
               run: restore.RestoredRun, model=None) -> dict[str, float]:
  """Validation loss / PPL / accuracy of a restored run, as in training.

  Each process scores its own slice of every validation batch (the
  pipeline's per-process batches, all of one size); the means over
  processes are the means over the whole set.
  """
  pipeline = from_config.build_data(config, os.path.abspath(workdir))
  eval_fn = jax.jit(functools.partial(scoring.eval_step,
                                      model=model or run.model))
  valid = scoring.evaluate(
      lambda batch: eval_fn(run.params, run.router_state, run.step, batch),
      ({k: np.asarray(batch[k]) for k in ('inputs', 'targets')}
       for batch in pipeline.valid_iterator()))
  if jax.process_count() > 1:
    loss, accuracy = np.mean(multihost_utils.process_allgather(
        np.asarray([valid['loss'], valid['accuracy']])), axis=0)
    valid.update(loss=float(loss), accuracy=float(accuracy),
                 ppl=math.exp(min(float(loss), 50.0)))
  return valid


def record(*, workdir: str, step: int, config_name: str, router: str,
           seed: int | None, task_results: dict[str, dict],
           valid: dict[str, float] | None, max_examples: int | None,
           seconds: float) -> dict[str, Any]:
  """The results file's content (format FORMAT)."""
  return {
      'format': FORMAT, 'workdir': os.path.abspath(workdir), 'step': step,
      'router': router, 'config_name': config_name, 'seed': seed,
      'ppl': valid['ppl'] if valid else None,
      'valid_loss': valid['loss'] if valid else None,
      'tasks': task_results,
      'average': average(task_results) if task_results else None,
      'max_examples': max_examples or None, 'seconds': round(seconds, 2),
  }


def config_name(config: ml_collections.ConfigDict) -> str:
  """A run's label: its router and size preset."""
  size = config.get('size', '') or ''
  return f'{config.moe.router}_{size}'.strip('_')


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str, *,
                        step: int | None = None, model=None,
                        with_ppl: bool = True) -> dict[str, Any]:
  """Scores the checkpoint config.eval selects on config.eval.tasks.

  Args:
    config: the run's config.
    workdir: the run directory.
    step: score this checkpoint instead of config.eval's choice.
    model: a model to score instead of the config's (same parameters), e.g.
      with DropTop applied.
    with_ppl: also compute the validation perplexity.

  Returns:
    The results record (see `record`).
  """
  names = tasks_lib.parse_task_list(config.eval.tasks)
  check_data(names, config.eval.data_dir)
  started = time.perf_counter()
  if step is None:
    step = select_step(config, workdir,
                       restore.checkpoint_steps(config, workdir))
  run = restore.restore_run(config, workdir, step, what='evaluate')
  scorer = text_scorer_lib.TextScorer.from_run(
      run, config, workdir, batch_size=config.eval.batch_size, model=model)
  logging.info('evaluating checkpoint %d of %s on %s', step, workdir,
               ', '.join(names))
  valid = validation(config, workdir, run, model) if with_ppl else None
  task_results = evaluate_tasks(scorer, names, config.eval.data_dir,
                                max_examples=config.eval.max_examples)
  return record(workdir=workdir, step=step, config_name=config_name(config),
                router=config.moe.router, seed=config.train.seed,
                task_results=task_results, valid=valid,
                max_examples=config.eval.max_examples,
                seconds=time.perf_counter() - started)


def markdown(result: dict[str, Any]) -> str:
  """One run's results as a Markdown table (percent, LibMoE's columns)."""
  names = list(result['tasks'])
  header = ['PPL'] + [tasks_lib.TASKS[n].display if n in tasks_lib.TASKS
                      else n for n in names] + ['Avg']
  ppl = result.get('ppl')
  cells = ['–' if ppl is None else f'{ppl:.2f}']
  cells += [f"{100 * result['tasks'][n]['score']:.2f}" for n in names]
  cells.append('–' if result['average'] is None else
               f"{100 * result['average']:.2f}")
  counts = ', '.join(f"{n} {result['tasks'][n]['count']}" for n in names)
  cap = result.get('max_examples')
  return '\n'.join([
      f"Zero-shot results of {result['workdir']} at step {result['step']} "
      f"({result['config_name']}); accuracy in %, LibMoE's rules "
      '(algorithms.md §7).',
      '',
      '| ' + ' | '.join(header) + ' |',
      '|' + '---|' * len(header),
      '| ' + ' | '.join(cells) + ' |',
      '',
      f'Items scored: {counts}' + (f' (at most {cap} per group)' if cap
                                   else '') + '.',
      ''])


def result_path(out_dir: str, step: int, suffix: str = '.json') -> str:
  return os.path.join(out_dir, f'step={step}{suffix}')


def write_results(out_dir: str, result: dict[str, Any]) -> tuple[str, str]:
  """Writes step=<N>.json and step=<N>.md into out_dir atomically."""
  os.makedirs(out_dir, exist_ok=True)
  json_path = result_path(out_dir, result['step'])
  md_path = result_path(out_dir, result['step'], '.md')
  run_log.write_text_atomic(json_path, json.dumps(result, indent=2) + '\n')
  run_log.write_text_atomic(md_path, markdown(result))
  return json_path, md_path


def _parse_args(argv: Sequence[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog='python -m eval.zero_shot',
      description='Zero-shot evaluation of a Hugging Face model directory '
      '(for a moe_jax workdir use python -m moe_jax.main --mode=eval).')
  parser.add_argument('--hf', required=True, help='HF model directory')
  parser.add_argument('--data_dir', required=True,
                      help='task folders (layout of ../shared/data/lm_eval)')
  parser.add_argument('--tasks', default='all')
  parser.add_argument('--max_examples', type=int, default=0)
  parser.add_argument('--batch_size', type=int, default=32)
  parser.add_argument('--max_len', type=int, default=2048)
  parser.add_argument('--out', default='', help='default: <hf>/eval')
  return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
  args = _parse_args(sys.argv[1:] if argv is None else argv)
  logging.set_verbosity(logging.INFO)
  try:
    names = tasks_lib.parse_task_list(args.tasks)
    check_data(names, args.data_dir)
    started = time.perf_counter()
    scorer = text_scorer_lib.TextScorer.from_hf(
        args.hf, batch_size=args.batch_size, max_len=args.max_len)
    task_results = evaluate_tasks(scorer, names, args.data_dir,
                                  max_examples=args.max_examples)
  except (FileNotFoundError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  result = record(workdir=args.hf, step=0,
                  config_name=os.path.basename(os.path.normpath(args.hf)),
                  router='hf', seed=None, task_results=task_results,
                  valid=None, max_examples=args.max_examples,
                  seconds=time.perf_counter() - started)
  paths = write_results(args.out or os.path.join(args.hf, RESULT_DIR),
                        result)
  print(markdown(result))
  print('wrote ' + ' and '.join(paths))
  return 0


if __name__ == '__main__':
  sys.exit(main())
