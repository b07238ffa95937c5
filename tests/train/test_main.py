"""End-to-end runs of `python -m moe_jax.main` on the tiny SMoE config.

Every run is its own process, as a user's would be. One uninterrupted run is
the reference; the others are stopped (halt_at_step), killed (SIGKILL),
damaged (a truncated checkpoint file, a leftover partial save) or made to
diverge, then resumed, and their per-step float32 losses must equal the
reference's exactly.
"""

import glob
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from moe_jax import run_log
from moe_jax import trace as trace_lib
from moe_jax.analysis import droptop

REPO = pathlib.Path(__file__).resolve().parents[2]
STEPS = 40
# A short tiny run: every step logged, checkpoints every 10, evals every 20.
OVERRIDES = (f'--config.train.steps={STEPS}', '--config.train.log_every=1',
             '--config.train.checkpoint_every=10',
             '--config.train.eval_every=20', '--config.train.keep=2',
             '--config.data.synthetic.num_docs=600')


def command(workdir, *extra):
  return [sys.executable, '-m', 'moe_jax.main',
          '--config=configs/smoe_154m.py:tiny', f'--workdir={workdir}',
          *OVERRIDES, *extra]


def environment(cache_dir):
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             # Later processes reuse the first one's compiled steps.
             JAX_COMPILATION_CACHE_DIR=str(cache_dir),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')
  env.pop('XLA_FLAGS', None)
  return env


@pytest.fixture(scope='module')
def runner(tmp_path_factory):
  root = tmp_path_factory.mktemp('main')
  env = environment(root / 'jax_cache')

  def run(workdir, *extra, expect_rc=0):
    proc = subprocess.run(command(workdir, *extra), cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == expect_rc, proc.stderr[-3000:]
    return proc

  run.root, run.env = root, env
  return run


@pytest.fixture(scope='module')
def reference(runner):
  """The uninterrupted run; later runs share its tokenizer and token cache."""
  workdir = runner.root / 'reference'
  # Traces during training do not touch the losses the other runs compare.
  proc = runner(workdir, '--config.train.trace_every=20')
  shared = (f'--config.data.tokenizer={workdir}/tokenizer_bpe512.model',
            f'--config.data.cache_dir={workdir}/cache')
  return workdir, proc, shared


def losses(workdir):
  frame = run_log.read_metrics(str(workdir))
  return frame['step'].to_numpy(), frame['loss'].to_numpy()


def test_tiny_run_trains_and_writes_its_workdir(reference):
  workdir, proc, _ = reference
  for name in ('config.json', 'metrics.jsonl', 'tokenizer_bpe512.model'):
    assert (workdir / name).is_file(), name
  assert glob.glob(str(workdir / 'tensorboard' / 'events.out.tfevents.*'))
  # keep=2 latest (30, 40); 40 also has the best validation loss here.
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['30', '40']
  steps, values = losses(workdir)
  np.testing.assert_array_equal(steps, np.arange(1, STEPS + 1))
  # ln(512) = 6.24 at the start; the synthetic corpus is learnable.
  assert values[0] > 6.0
  assert values[-5:].mean() < values[0] - 1.5
  valid = run_log.read_metrics(str(workdir), 'valid')
  assert list(valid['step']) == [20, 40]
  assert valid['loss'].iloc[-1] < valid['loss'].iloc[0]
  assert f'step {STEPS}/{STEPS}' in proc.stderr and 'tok/s' in proc.stderr
  # The log says what takes time, and not what does not concern the user.
  for said in ('training a SentencePiece', 'building the token cache',
               'compiling the train step', 'first step (compilation '
               'included) took', 'checkpoint 10: save started'):
    assert said in proc.stderr, said
  assert "Unable to initialize backend 'tpu'" not in proc.stderr
  # train.trace_every=20: the validation set traced at steps 20 and 40.
  traced = trace_lib.read_trace(str(workdir / 'traces'), layer=1)
  assert sorted({int(str(s)) for s in traced['step']}) == [20, 40]
  assert len(traced) == 2 * 4 * 8 * 64


def test_resume_in_a_new_process_is_exact(runner, reference):
  ref_dir, _, shared = reference
  workdir = runner.root / 'halted'
  runner(workdir, *shared, '--config.train.halt_at_step=20')
  steps, _ = losses(workdir)
  assert steps.max() == 20
  second = runner(workdir, *shared)
  assert 'resumed from checkpoint 20' in second.stderr
  np.testing.assert_array_equal(losses(workdir)[1], losses(ref_dir)[1])


def test_sigkill_during_training_resumes_from_last_complete_checkpoint(
    runner, reference):
  ref_dir, _, shared = reference
  workdir = runner.root / 'killed'
  proc = subprocess.Popen(command(workdir, *shared), cwd=REPO,
                          env=runner.env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  while not (workdir / 'checkpoints' / '10').is_dir():
    assert proc.poll() is None, 'the run ended before its first checkpoint'
    assert time.time() < deadline
    time.sleep(0.01)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL
  complete = sorted(int(d) for d in os.listdir(workdir / 'checkpoints')
                    if d.isdigit())
  assert complete and complete[-1] < STEPS
  # A save cut short leaves only an orbax temporary directory.
  partial = workdir / 'checkpoints' / f'{STEPS}.orbax-checkpoint-tmp-1'
  shutil.copytree(workdir / 'checkpoints' / str(complete[-1]), partial)
  resumed = runner(workdir, *shared)
  assert f'resumed from checkpoint {complete[-1]}' in resumed.stderr
  np.testing.assert_array_equal(losses(workdir)[1], losses(ref_dir)[1])


def test_corrupt_checkpoint_is_set_aside_loudly(runner, reference):
  ref_dir, _, shared = reference
  workdir = runner.root / 'corrupt'
  shutil.copytree(ref_dir, workdir, ignore=shutil.ignore_patterns('cache'))
  data_files = glob.glob(str(workdir / 'checkpoints' / '40' / 'state' / '**'
                             / 'd' / '*'), recursive=True)
  assert data_files
  for path in data_files:
    with open(path, 'r+b') as f:
      f.truncate(8)
  proc = runner(workdir, *shared)
  assert 'checkpoint 40' in proc.stderr
  assert 'could not be restored' in proc.stderr
  assert 'resumed from checkpoint 30' in proc.stderr
  assert glob.glob(str(workdir / 'checkpoints' / '40.corrupt-*'))
  # Steps 31..40 were trained again, identically.
  np.testing.assert_array_equal(losses(workdir)[1], losses(ref_dir)[1])


def test_divergence_stops_the_run_and_keeps_the_last_good_checkpoint(
    runner, reference):
  _, _, shared = reference
  workdir = runner.root / 'diverged'
  # Warmup from lr 0: step 1 changes nothing, step 2 takes lr 1e30 / 3 and
  # overflows the parameters.
  proc = runner(workdir, *shared, '--config.train.learning_rate=1e30',
                '--config.train.warmup_steps=3',
                '--config.train.checkpoint_every=1', expect_rc=3)
  assert 'at step 2: training stopped' in proc.stderr
  assert 'last good checkpoint is step 1' in proc.stderr
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['1']


def test_divergence_before_any_checkpoint_flushes_the_good_steps(
    runner, reference):
  _, _, shared = reference
  workdir = runner.root / 'diverged_early'
  # Nothing logged or saved before the NaN at step 2 (intervals of 1000).
  proc = runner(workdir, *shared, '--config.train.learning_rate=1e30',
                '--config.train.warmup_steps=3',
                '--config.train.log_every=1000',
                '--config.train.checkpoint_every=1000', expect_rc=3)
  assert 'No checkpoint had been saved yet' in proc.stderr
  assert 'step None' not in proc.stderr
  # Step 1 was good: its record is written before the stop.
  steps, values = losses(workdir)
  assert list(steps) == [1] and np.isfinite(values).all()


def test_second_start_of_a_finished_run_says_so(runner, reference):
  ref_dir, _, shared = reference
  workdir = runner.root / 'finished'
  shutil.copytree(ref_dir, workdir, ignore=shutil.ignore_patterns('cache'))
  before = (workdir / 'metrics.jsonl').read_text()
  proc = runner(workdir, *shared)
  assert f'nothing to train: {workdir} already holds step {STEPS}' in (
      proc.stderr)
  assert 'None' not in proc.stderr
  assert (workdir / 'metrics.jsonl').read_text() == before


def test_torn_metrics_line_does_not_stop_a_resume(runner, reference):
  ref_dir, _, shared = reference
  workdir = runner.root / 'torn'
  shutil.copytree(ref_dir, workdir, ignore=shutil.ignore_patterns('cache'))
  # What a kill in the middle of a record's write leaves.
  with open(workdir / 'metrics.jsonl', 'a', encoding='utf-8') as f:
    f.write('{"step": 41, "split": "train", "attempt": 0, "loss": 2.3')
  steps, _ = losses(workdir)   # readers skip the torn line
  assert steps.max() == STEPS
  proc = runner(workdir, *shared, f'--config.train.steps={STEPS + 2}')
  assert 'torn final line' in proc.stderr
  # The file is whole lines again, and the new steps are in it.
  lines = (workdir / 'metrics.jsonl').read_text().splitlines()
  assert all(line.startswith('{') and line.endswith('}') for line in lines)
  assert losses(workdir)[0].max() == STEPS + 2


def test_every_checkpointed_step_has_its_record_after_a_kill(runner,
                                                             reference):
  # log_every does not divide checkpoint_every: the steps a checkpoint covers
  # are never re-run after a kill, so their records must already be on disk.
  ref_dir, _, shared = reference
  workdir = runner.root / 'killed_records'
  args = command(workdir, *shared, '--config.train.log_every=1000')
  proc = subprocess.Popen(args, cwd=REPO, env=runner.env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  while not (workdir / 'checkpoints' / '10').is_dir():
    assert proc.poll() is None, 'the run ended before its first checkpoint'
    assert time.time() < deadline
    time.sleep(0.005)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  # Written before checkpoint 10 was started, whatever the log interval.
  assert set(range(1, 11)) <= set(losses(workdir)[0])
  runner(workdir, *shared, '--config.train.log_every=1000')
  steps, values = losses(workdir)
  np.testing.assert_array_equal(steps, np.arange(1, STEPS + 1))
  np.testing.assert_array_equal(values, losses(ref_dir)[1])


def test_unknown_loss_name_lists_the_known_ones(runner):
  proc = subprocess.run(
      command(runner.root / 'typo', '--config.loss.coefficients.balanc=0.1'),
      cwd=REPO, env=runner.env, capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0
  assert ("config.loss.coefficients has no field 'balanc'; known names: "
          "['balance']") in proc.stderr
  assert 'Traceback' not in proc.stderr


def test_eight_cpu_devices_train_like_one(runner, reference):
  # The same run data-parallel over 8 host devices (mesh data=8): the batch
  # is sharded, the step is the same function; only reduction order differs.
  ref_dir, _, shared = reference
  workdir = runner.root / 'eight_devices'
  env = dict(runner.env,
             XLA_FLAGS='--xla_force_host_platform_device_count=8')
  proc = subprocess.run(
      command(workdir, *shared, '--config.train.halt_at_step=10'), cwd=REPO,
      env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "mesh: {'data': 8, 'fsdp': 1, 'expert': 1, 'tensor': 1}" in proc.stderr
  steps, values = losses(workdir)
  assert list(steps) == list(range(1, 11))
  _, ref_values = losses(ref_dir)
  # Same parameters, batches and schedule; only float32 summation order
  # differs, and Adam's first steps (~lr·sign(g)) amplify that a little.
  np.testing.assert_allclose(values, ref_values[:10], rtol=1e-4)


SHAKESPEARE = (REPO / '..' / 'shared' / 'data' / 'tinyshakespeare.txt').resolve()


@pytest.mark.skipif(not SHAKESPEARE.is_file(),
                    reason=f'{SHAKESPEARE} is absent (the shared data lies '
                    'beside the checkout on the development machines only)')
def test_tiny_run_on_tinyshakespeare(runner):
  # Real text from a file: paragraphs as documents, a 512-piece BPE trained
  # on it, validation windows held out from the end of the stream.
  workdir = runner.root / 'shakespeare'
  runner(workdir, '--config.data.source=files',
         f'--config.data.train_path={SHAKESPEARE}',
         '--config.data.doc_mode=paragraph', '--config.data.max_tokens=200000',
         '--config.train.steps=60', '--config.train.eval_every=30')
  _, values = losses(workdir)
  assert values[0] > 6.0 and values[-5:].mean() < values[0] - 1.0
  valid = run_log.read_metrics(str(workdir), 'valid')
  assert list(valid['step']) == [30, 60]
  assert valid['loss'].iloc[1] < valid['loss'].iloc[0]


def test_trace_mode_writes_routing_of_the_newest_checkpoint(runner, reference):
  ref_dir, _, shared = reference
  workdir = runner.root / 'traced'
  shutil.copytree(ref_dir, workdir,
                  ignore=shutil.ignore_patterns('cache', 'traces'))
  runner(workdir, *shared, '--mode=trace')
  layer0 = trace_lib.read_trace(str(workdir / 'traces'), layer=0)
  # The validation set: eval_batches 4 x 8 windows x 64 tokens, step 40.
  assert len(layer0) == 4 * 8 * 64
  assert {str(s) for s in layer0['step']} == {str(STEPS)}
  assert set(layer0['domain']) <= {0, 1, 2, 3}
  choices = layer0[[f'choice_{j}' for j in range(4)]].to_numpy()
  weights = layer0[[f'weight_{j}' for j in range(4)]].to_numpy()
  # SMoE top-4 of 16: distinct experts, renormalised weights in order.
  assert all(len(set(row)) == 4 for row in choices)
  assert choices.min() >= 0 and choices.max() < 16
  np.testing.assert_allclose(weights.sum(axis=1), 1.0, rtol=1e-5)
  # SMoE selects the softmax's top-k: its top-1 is the first choice.
  np.testing.assert_array_equal(layer0['top1'], choices[:, 0])
  assert np.all(np.diff(weights, axis=1) <= 1e-7)
  # The restored checkpoint routes exactly as the state did in training.
  in_training = trace_lib.read_trace(str(ref_dir / 'traces'), step=STEPS,
                                     layer=0)
  key = ['sequence', 'position']
  in_training = in_training.sort_values(key).reset_index(drop=True)
  layer0 = layer0.sort_values(key).reset_index(drop=True)
  np.testing.assert_array_equal(
      layer0[[f'choice_{j}' for j in range(4)]].to_numpy(),
      in_training[[f'choice_{j}' for j in range(4)]].to_numpy())
  np.testing.assert_allclose(
      layer0[[f'weight_{j}' for j in range(4)]].to_numpy(),
      in_training[[f'weight_{j}' for j in range(4)]].to_numpy(), rtol=1e-5)


def test_droptop_mode_removing_the_top_expert_raises_the_loss(runner,
                                                              reference):
  ref_dir, _, shared = reference
  workdir = runner.root / 'droptop'
  shutil.copytree(ref_dir, workdir,
                  ignore=shutil.ignore_patterns('cache', 'traces'))
  runner(workdir, *shared, '--mode=droptop')
  result = droptop.read_droptop(str(workdir)).set_index('name')
  assert list(result.index) == ['intact', 'DropTop-1', 'DropTop-1&2']
  # The intact row is the training run's own step-40 validation.
  valid = run_log.read_metrics(str(ref_dir), 'valid').set_index('step')
  np.testing.assert_allclose(result.loss['intact'], valid.loss[STEPS],
                             rtol=1e-5)
  np.testing.assert_allclose(result.accuracy['intact'],
                             valid.accuracy[STEPS], rtol=1e-5)
  # Without its top expert the tiny SMoE predicts worse.
  assert result.loss['DropTop-1'] > result.loss['intact'] + 0.01, result
  assert result.delta_loss['DropTop-1'] == pytest.approx(
      result.loss['DropTop-1'] - result.loss['intact'])
