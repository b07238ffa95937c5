"""Two processes of 4 CPU devices (launch/local.sh, jax.distributed) train
like one process of 8, and a run moves between the two layouts on resume.

Reference: one process, 8 devices, STEPS steps. Run A: 2 processes halted at
HALT, resumed by 1 process. Run B: 1 process halted at HALT, resumed by 2.
Every logged step loss of A and B must equal the reference's.
"""

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from moe_jax import run_log

REPO = pathlib.Path(__file__).resolve().parents[2]
STEPS, HALT = 6, 3
ARGS = ('--config=configs/smoe_154m.py:tiny', f'--config.train.steps={STEPS}',
        '--config.train.log_every=1', '--config.train.eval_every=1000',
        '--config.data.synthetic.num_docs=300')


def _env(tmp):
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             JAX_COMPILATION_CACHE_DIR=str(tmp / 'jax_cache'),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0')
  env.pop('XLA_FLAGS', None)
  for var in ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES',
              'JAX_PROCESS_ID'):
    env.pop(var, None)
  return env


@pytest.fixture(scope='module')
def launch(tmp_path_factory):
  tmp = tmp_path_factory.mktemp('multiprocess')
  env = _env(tmp)

  def run(workdir, processes, *extra):
    main = [sys.executable, '-m', 'moe_jax.main', f'--workdir={workdir}',
            *ARGS, *extra]
    if processes == 1:
      cmd, run_env = main, dict(
          env, XLA_FLAGS='--xla_force_host_platform_device_count=8')
    else:
      cmd = ['launch/local.sh', str(processes), '--cpu_devices', '4', '--',
             *main]
      run_env = dict(env, LOG_DIR=str(tmp / f'{workdir.name}_logs'))
    proc = subprocess.run(cmd, cwd=REPO, env=run_env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc

  run.tmp = tmp
  return run


@pytest.fixture(scope='module')
def reference(launch):
  workdir = launch.tmp / 'one_process'
  launch(workdir, 1)
  return run_log.read_metrics(str(workdir))['loss'].to_numpy()


@pytest.mark.parametrize('first,second', [(2, 1), (1, 2)],
                         ids=['two_then_one', 'one_then_two'])
def test_two_processes_equal_one_and_resume_across_layouts(
    launch, reference, first, second):
  workdir = launch.tmp / f'{first}_then_{second}'
  launch(workdir, first, f'--config.train.halt_at_step={HALT}')
  proc = launch(workdir, second)
  assert f'resumed from checkpoint {HALT}' in proc.stderr
  frame = run_log.read_metrics(str(workdir))
  assert list(frame['step']) == list(range(1, STEPS + 1))
  np.testing.assert_allclose(frame['loss'].to_numpy(), reference, rtol=1e-6)
