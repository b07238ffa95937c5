"""Checkpoints written before the house refactor still resume, exactly; and
a config that does not match a workdir's checkpoints stops with an error.

tests/fixtures/legacy_ckpt_<router>/ holds a tiny run stopped at step 2 by
the code of commit 821ade2 (TrainState with `remoe_lambda`), and the losses
that code logged when resumed to step 4 (expected.json). Each run is its own
process on one CPU device, as the fixture was written.
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from moe_jax import run_log

REPO = pathlib.Path(__file__).resolve().parents[2]
FIXTURES = REPO / 'tests' / 'fixtures'
# The overrides the fixture was written with.
OVERRIDES = ('--config.train.steps=4', '--config.train.checkpoint_every=2',
             '--config.train.log_every=1', '--config.train.eval_every=2',
             '--config.data.synthetic.num_docs=400')


def run_main(router, workdir, *extra):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env.pop('XLA_FLAGS', None)
  return subprocess.run(
      [sys.executable, '-m', 'moe_jax.main',
       f'--config=configs/{router}_154m.py:tiny', f'--workdir={workdir}',
       *OVERRIDES, *extra],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def fixture_copy(router, tmp_path):
  workdir = tmp_path / router
  shutil.copytree(FIXTURES / f'legacy_ckpt_{router}', workdir)
  return workdir


@pytest.mark.parametrize('router', ['smoe', 'remoe'])
def test_legacy_checkpoint_resumes_with_identical_losses(router, tmp_path):
  workdir = fixture_copy(router, tmp_path)
  expected = json.loads((workdir / 'expected.json').read_text())
  proc = run_main(router, workdir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'resumed from checkpoint 2' in proc.stderr
  frame = run_log.read_metrics(str(workdir))
  losses = dict(zip(frame['step'], frame['loss']))
  for step in (3, 4):
    # The same float32 computation from the same state: bitwise equal.
    assert losses[step] == expected['train_loss'][str(step)], step
  valid = run_log.read_metrics(str(workdir), split='valid')
  assert valid[valid['step'] == 4]['loss'].item() == expected[
      'valid_loss_step4']
  if router == 'remoe':
    # λ came through the conversion (it scales the step-3 loss's L1 term).
    assert 'remoe_lambda' in frame.columns


def test_changed_model_stops_with_the_changed_fields(tmp_path):
  workdir = fixture_copy('smoe', tmp_path)
  before = sorted(os.listdir(workdir / 'checkpoints'))
  config_before = (workdir / 'config.json').read_text()
  proc = run_main('smoe', workdir, '--config.model.num_layers=3')
  assert proc.returncode != 0
  assert 'model.num_layers (2 -> 3)' in proc.stderr, proc.stderr[-3000:]
  assert 'new --workdir' in proc.stderr
  # Nothing was set aside, overwritten or trained.
  assert sorted(os.listdir(workdir / 'checkpoints')) == before
  assert (workdir / 'config.json').read_text() == config_before
  assert 'Traceback' not in proc.stderr.split('does not match')[0][-200:]


def test_analysis_with_the_wrong_config_names_the_fields(tmp_path):
  workdir = fixture_copy('smoe', tmp_path)
  proc = run_main('smoe', workdir, '--mode=trace',
                  '--config.moe.num_experts=8')
  assert proc.returncode != 0
  assert 'moe.num_experts (16 -> 8)' in proc.stderr, proc.stderr[-3000:]
  assert 'cannot trace it' in proc.stderr
