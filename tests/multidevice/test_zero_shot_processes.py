"""Zero-shot evaluation over 2 processes x 4 CPU devices equals 1 process.

A tiny run is trained for a few steps; `--mode=eval` then scores the same
checkpoint on a small PIQA- and BLiMP-format task folder written here (no
../shared needed) once in one process of 8 devices and once in two
processes of 4 (launch/local.sh, jax.distributed). The scorer shards every
batch over all 8 devices in both layouts; the results files must agree.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
ARGS = ('--config=configs/smoe_154m.py:tiny', '--config.train.steps=4',
        '--config.train.log_every=1', '--config.train.eval_every=4',
        '--config.data.synthetic.num_docs=300')


def _env(tmp):
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             JAX_COMPILATION_CACHE_DIR=str(tmp / 'jax_cache'),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
             LOG_DIR=str(tmp / 'logs'))
  env.pop('XLA_FLAGS', None)
  for var in ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES',
              'JAX_PROCESS_ID'):
    env.pop(var, None)
  return env


def _task_folder(root: pathlib.Path) -> pathlib.Path:
  """PIQA (7 items, more than one scoring batch row per device) and one
  BLiMP paradigm (5 pairs) in their on-disk formats."""
  piqa = root / 'piqa'
  piqa.mkdir(parents=True)
  goals = ['open a jar', 'boil water', 'dry a shirt', 'cut bread',
           'light a room', 'cool tea', 'plant a seed']
  with open(piqa / 'valid.jsonl', 'w') as f:
    for i, goal in enumerate(goals):
      f.write(json.dumps({'goal': f'How do you {goal}?',
                          'sol1': f'use step {i} one way',
                          'sol2': f'try another way number {i}'}) + '\n')
  (piqa / 'valid-labels.lst').write_text(
      '\n'.join(str(i % 2) for i in range(len(goals))) + '\n')
  blimp = root / 'blimp'
  blimp.mkdir()
  with open(blimp / 'anaphor_number_agreement.jsonl', 'w') as f:
    for good, bad in [('The cats saw themselves.', 'The cats saw itself.'),
                      ('A boy hurt himself.', 'A boy hurt themselves.'),
                      ('Dogs like dogs.', 'Dogs likes dogs.'),
                      ('She is here.', 'She are here.'),
                      ('We were late.', 'We was late.')]:
      f.write(json.dumps({'sentence_good': good, 'sentence_bad': bad}) + '\n')
  return root


def test_two_processes_score_like_one(tmp_path):
  env = _env(tmp_path)
  workdir = tmp_path / 'run'
  data = _task_folder(tmp_path / 'tasks')
  main = [sys.executable, '-m', 'moe_jax.main', f'--workdir={workdir}', *ARGS,
          f'--config.eval.data_dir={data}', '--config.eval.tasks=blimp,piqa',
          '--config.eval.batch_size=8']
  one = dict(env, XLA_FLAGS='--xla_force_host_platform_device_count=8')
  for extra in ((), ('--mode=eval',)):
    proc = subprocess.run([*main, *extra], cwd=REPO, env=one,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
  result_path = workdir / 'eval' / 'step=4.json'
  single = json.loads(result_path.read_text())
  result_path.unlink()
  proc = subprocess.run(['launch/local.sh', '2', '--cpu_devices', '4', '--',
                         *main, '--mode=eval'], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  double = json.loads(result_path.read_text())
  assert double['tasks']['piqa']['count'] == 7
  assert double['tasks']['blimp']['count'] == 5
  assert double['average'] == single['average']
  for name, entry in single['tasks'].items():
    entry.pop('seconds')
    assert {k: v for k, v in double['tasks'][name].items()
            if k != 'seconds'} == entry
  assert double['ppl'] == pytest.approx(single['ppl'], rel=1e-5)
