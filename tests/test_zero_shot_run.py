"""Zero-shot evaluation end to end: `python -m moe_jax.main --mode=eval`.

A tiny SMoE model is trained for 300 steps on the C4 sample of
../shared/data (with the quick zero-shot evaluation every 150 steps), then
scored on the seven tasks with offline files. BLiMP must be above chance:
its 67 paradigms x 100 pairs give a standard error of 0.6 points at 50%, and
the bar is chance + 2 standard errors. Skipped without ../shared/data.
"""

import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

from moe_jax import run_log

REPO = pathlib.Path(__file__).resolve().parents[1]
DATA = (REPO / '..' / 'shared' / 'data').resolve()
TASK_DATA = DATA / 'lm_eval'
C4 = DATA / 'pretrain'
SEVEN = ('lambada', 'blimp', 'piqa', 'arc', 'race', 'siqa', 'commonsenseqa')

pytestmark = pytest.mark.skipif(
    not (TASK_DATA / 'blimp').is_dir() or not (C4 / 'c4_hf_parquet').is_dir(),
    reason='needs ../shared/data (zero-shot task files and the C4 sample) '
    'next to the repository')


def main_command(workdir, *extra):
  return [sys.executable, '-m', 'moe_jax.main',
          '--config=configs/smoe_154m.py:tiny', f'--workdir={workdir}',
          '--config.data.source=files',
          f'--config.data.train_path={C4}/c4_redpajama_sample/'
          'tiny_c4_sample.jsonl',
          f'--config.data.eval_path={C4}/c4_hf_parquet/'
          'c4-validation-00000-of-01637.parquet',
          '--config.train.steps=300', '--config.train.checkpoint_every=150',
          '--config.train.eval_every=150',
          f'--config.eval.data_dir={TASK_DATA}', *extra]


def run(workdir, *extra, expect_rc=0):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env.pop('XLA_FLAGS', None)
  proc = subprocess.run(main_command(workdir, *extra), cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == expect_rc, proc.stderr[-3000:]
  return proc


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('zero_shot') / 'run'
  run(workdir, '--config.train.eval_tasks_every=150',
      '--config.train.eval_tasks=blimp,piqa',
      '--config.train.eval_tasks_max_examples=10')
  return workdir


def test_quick_zero_shot_is_logged_during_training(trained):
  records = [r for r in run_log.read_records(str(trained))
             if r['split'] == 'zero_shot']
  assert [r['step'] for r in records] == [150, 300]
  for r in records:
    assert 0.0 <= r['blimp'] <= 1.0 and 0.0 <= r['piqa'] <= 1.0
    assert r['average'] == pytest.approx((r['blimp'] + r['piqa']) / 2)


def test_seven_offline_tasks(trained):
  run(trained, '--mode=eval', f'--config.eval.tasks={",".join(SEVEN)}',
      '--config.eval.max_examples=10')
  result = json.loads((trained / 'eval' / 'step=300.json').read_text())
  assert result['format'] == 'moe_jax.zero_shot/1'
  assert result['step'] == 300 and result['router'] == 'smoe'
  assert list(result['tasks']) == list(SEVEN)
  # At most 10 items per group: BLiMP 67 groups, ARC and RACE 2 each.
  counts = {name: entry['count'] for name, entry in result['tasks'].items()}
  assert counts == {'lambada': 10, 'blimp': 670, 'piqa': 10, 'arc': 20,
                    'race': 20, 'siqa': 10, 'commonsenseqa': 10}
  for entry in result['tasks'].values():
    groups = [g['accuracy'] for g in entry['groups'].values()]
    assert entry['score'] == pytest.approx(sum(groups) / len(groups))
  assert result['average'] == pytest.approx(
      sum(e['score'] for e in result['tasks'].values()) / len(SEVEN))
  # PPL is the validation perplexity training logged at step 300.
  valid = [r for r in run_log.read_records(str(trained))
           if r['split'] == 'valid' and r['step'] == 300][-1]
  assert result['ppl'] == pytest.approx(valid['ppl'], rel=1e-5)
  table = (trained / 'eval' / 'step=300.md').read_text()
  assert '| PPL | LAMBADA | BLiMP | PIQA | ARC | RACE | SIQA | CSQA | Avg |' \
      in table


def test_blimp_above_chance_on_the_best_checkpoint(trained):
  records = [r for r in run_log.read_records(str(trained))
             if r['split'] == 'zero_shot']
  best = max(records, key=lambda r: r['average'])['step']
  run(trained, '--mode=eval', '--config.eval.tasks=blimp',
      '--config.eval.max_examples=100',
      '--config.eval.select=best_zero_shot')
  result = json.loads((trained / 'eval' / f'step={best}.json').read_text())
  blimp = result['tasks']['blimp']
  assert blimp['count'] == 6700
  assert blimp['seq_average'] > 0.5 + 2 * math.sqrt(0.25 / 6700), blimp


def test_missing_task_folder_is_one_line(trained, tmp_path):
  proc = run(trained, '--mode=eval', f'--config.eval.data_dir={tmp_path}',
             '--config.eval.tasks=piqa', expect_rc=2)
  assert 'config.eval.data_dir' in proc.stderr
  assert str(tmp_path / 'piqa') in proc.stderr
  assert 'Traceback' not in proc.stderr


def test_droptop_reports_the_zero_shot_change(trained):
  run(trained, '--mode=droptop', '--config.eval.tasks=blimp',
      '--config.eval.max_examples=5')
  rows = json.loads((trained / 'droptop.json').read_text())
  assert [r['name'] for r in rows] == ['intact', 'DropTop-1', 'DropTop-1&2']
  intact = rows[0]
  assert intact['delta_zero_shot'] == 0.0
  for row in rows[1:]:
    assert row['delta_zero_shot'] == pytest.approx(
        row['zero_shot_average'] - intact['zero_shot_average'])
