"""eval.sweep with a fake command runner: commands, resumption, failures.

Nothing trains: the fake runner stands in for moe_jax.main, writing the
config.json a training leaves and the eval/step=<N>.json --mode=eval writes.
"""

from __future__ import annotations

import io
import json
import os
import sys

import pytest

from eval import sweep
from eval import table

CONFIGS = ['configs/smoe_154m.py:tiny', 'configs/sigmoid_154m.py:tiny']


class FakeMain:
  """Records commands; 'trains' and 'evaluates' by writing the files.

  Attributes:
    calls: (command, log path) of every call, in order.
    fail: {(config label, seed, phase)} whose command exits 1.
    eval_writes: False: --mode=eval exits 0 without writing its results.
  """

  def __init__(self, fail=(), eval_writes=True):
    self.calls = []
    self.fail = set(fail)
    self.eval_writes = eval_writes

  @staticmethod
  def flag(command, name, default=None):
    prefix = f'--{name}='
    values = [c[len(prefix):] for c in command if c.startswith(prefix)]
    return values[-1] if values else default

  def __call__(self, command, log_path):
    self.calls.append((list(command), log_path))
    config = self.flag(command, 'config')
    workdir = self.flag(command, 'workdir')
    seed = int(self.flag(command, 'config.train.seed'))
    steps = int(self.flag(command, 'config.train.steps', 200))
    phase = 'eval' if '--mode=eval' in command else 'training'
    with open(log_path, 'a', encoding='utf-8') as log:
      log.write(f'{phase}\n')
    if (sweep.config_label(config), seed, phase) in self.fail:
      return 1
    stem = os.path.splitext(os.path.basename(config.partition(':')[0]))[0]
    router = stem.rsplit('_', 1)[0]
    if phase == 'training':
      with open(os.path.join(workdir, 'config.json'), 'w',
                encoding='utf-8') as f:
        json.dump({'train': {'steps': steps, 'seed': seed,
                             'halt_at_step': 0}}, f)
    elif self.eval_writes:
      os.makedirs(os.path.join(workdir, 'eval'), exist_ok=True)
      score = 0.4 + 0.01 * seed + (0.05 if router == 'sigmoid' else 0)
      with open(os.path.join(workdir, 'eval', f'step={steps}.json'), 'w',
                encoding='utf-8') as f:
        json.dump({'format': 'moe_jax.zero_shot/1', 'workdir': workdir,
                   'step': steps, 'router': router,
                   'config_name': sweep.config_label(config), 'seed': seed,
                   'ppl': 16.0 - seed, 'valid_loss': 2.7,
                   'tasks': {'piqa': {'score': score, 'count': 20}},
                   'average': score, 'max_examples': 20}, f)
    return 0

  def phases(self):
    return ['eval' if '--mode=eval' in c else 'training'
            for c, _ in self.calls]


def test_commands_workdirs_and_table(tmp_path):
  root = str(tmp_path / 'sweep')
  fake, out = FakeMain(), io.StringIO()
  result = sweep.run_sweep(CONFIGS, 2, root, overrides=['train.steps=300'],
                           tasks=['piqa', 'arc'], max_examples=20,
                           runner=fake, out=out)
  assert result['failures'] == [] and result['table_error'] is None
  w = os.path.join(root, 'smoe_154m_tiny_seed0')
  train = [sys.executable, '-m', 'moe_jax.main',
           '--config=configs/smoe_154m.py:tiny', f'--workdir={w}',
           '--config.train.seed=0', '--config.train.steps=300']
  assert fake.calls[0] == (train, os.path.join(w, 'sweep.log'))
  assert fake.calls[1] == (train + ['--mode=eval',
                                    '--config.eval.tasks=piqa,arc',
                                    '--config.eval.max_examples=20'],
                           os.path.join(w, 'sweep.log'))
  # Config-major order, seeds 0..n-1, one workdir each.
  assert [(fake.flag(c, 'workdir'), fake.flag(c, 'config.train.seed'))
          for c, _ in fake.calls[::2]] == [
              (os.path.join(root, f'{name}_seed{s}'), str(s))
              for name in ('smoe_154m_tiny', 'sigmoid_154m_tiny')
              for s in (0, 1)]
  assert fake.phases() == ['training', 'eval'] * 4
  lines = out.getvalue().splitlines()
  assert '[3/4] sigmoid_154m:tiny seed 0: training' in lines
  assert '[3/4] sigmoid_154m:tiny seed 0: evaluating step 300' in lines
  # The table of the four runs, in root/table/.
  for name in ('table.md', 'table.csv', 'runs.csv', 'table.png'):
    assert os.path.exists(os.path.join(root, 'table', name)), name
  summary = table.read_summary(os.path.join(root, 'table', 'table.csv'))
  assert list(summary.index) == ['smoe', 'sigmoid']
  assert list(summary.n) == [2, 2]
  # smoe piqa 0.40, 0.41 -> 40.50; sigmoid 0.45, 0.46 -> 45.50.
  assert summary.piqa_mean.tolist() == pytest.approx([0.405, 0.455])
  assert '| SMoE |' in result['markdown'] and '| σ-MoE |' in result['markdown']


def test_second_invocation_skips_finished_evals(tmp_path):
  root = str(tmp_path / 'sweep')
  sweep.run_sweep(CONFIGS, 2, root, runner=FakeMain(), out=io.StringIO())
  fake, out = FakeMain(), io.StringIO()
  result = sweep.run_sweep(CONFIGS, 2, root, runner=fake, out=out)
  # Training is resumed (main finds nothing to train); no eval reruns.
  assert fake.phases() == ['training'] * 4
  assert result['failures'] == [] and result['table'] is not None
  assert ('[4/4] sigmoid_154m:tiny seed 1: eval at step 200 done before'
          in out.getvalue())
  # More steps: a new final step, so every run is evaluated again.
  fake = FakeMain()
  sweep.run_sweep(CONFIGS, 2, root, overrides=['train.steps=400'],
                  runner=fake, out=io.StringIO())
  assert fake.phases() == ['training', 'eval'] * 4
  assert os.path.exists(os.path.join(root, 'smoe_154m_tiny_seed1', 'eval',
                                     'step=400.json'))


def test_failed_runs_are_reported_and_the_others_go_on(tmp_path):
  root = str(tmp_path / 'sweep')
  fake = FakeMain(fail={('sigmoid_154m:tiny', 0, 'training'),
                        ('smoe_154m:tiny', 1, 'eval')})
  out = io.StringIO()
  result = sweep.run_sweep(CONFIGS, 2, root, runner=fake, out=out)
  # The failed training is not evaluated; every other run is.
  assert fake.phases() == ['training', 'eval', 'training', 'eval',
                           'training', 'training', 'eval']
  failures = {(f.run.label, f.phase) for f in result['failures']}
  assert failures == {('sigmoid_154m:tiny seed 0', 'training'),
                      ('smoe_154m:tiny seed 1', 'eval')}
  text = out.getvalue()
  log = os.path.join(root, 'sigmoid_154m_tiny_seed0', 'sweep.log')
  assert f'log: {log}' in text
  assert '--config=configs/sigmoid_154m.py:tiny' in text
  assert '2 of 4 runs failed' in text
  # The table holds the two evaluated runs.
  summary = table.read_summary(os.path.join(root, 'table', 'table.csv'))
  assert summary.n.to_dict() == {'smoe': 1, 'sigmoid': 1}


def test_eval_that_writes_nothing_is_a_failure(tmp_path):
  result = sweep.run_sweep(CONFIGS[:1], 1, str(tmp_path), out=io.StringIO(),
                           runner=FakeMain(eval_writes=False))
  [failure] = result['failures']
  assert failure.phase == 'eval' and 'wrote no' in failure.reason
  assert 'step=200.json' in failure.reason
  assert result['table'] is None and result['table_error']


def test_command_line_exit_codes(tmp_path, monkeypatch, capsys):
  monkeypatch.chdir(tmp_path)
  os.makedirs('configs')
  for name in ('smoe_154m.py', 'sigmoid_154m.py'):
    open(os.path.join('configs', name), 'w').close()
  argv = ['--configs=' + ','.join(CONFIGS), '--seeds=2', '--root=sweep',
          '--set=train.steps=300', '--tasks=piqa', '--max_examples=20']
  fake = FakeMain()
  assert sweep.main(argv, runner=fake) == 0
  assert '--config.eval.tasks=piqa' in fake.calls[1][0]
  assert os.path.exists('sweep/table/table.md')
  failing = FakeMain(fail={('smoe_154m:tiny', 0, 'training')})
  assert sweep.main(argv[:-3] + ['--set=train.steps=500'],
                    runner=failing) == 1
  capsys.readouterr()
  for bad, message in (('--set=train.steps', 'expected <field>=<value>'),
                       ('--tasks=piqa,mmlu', "['mmlu'] unknown"),
                       ('--seeds=0', 'expected an integer >= 1')):
    with pytest.raises(SystemExit) as exit_info:
      sweep.main(argv + [bad], runner=fake)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and message in err
  with pytest.raises(SystemExit):
    sweep.main(['--configs=configs/nope.py:tiny', '--root=sweep'])
  assert 'configs/nope.py does not exist' in capsys.readouterr().err


def test_config_specs_keep_commas_of_their_args():
  assert sweep.split_configs(
      ['configs/sigmoid_154m.py:preset=libmoe,tiny,configs/smoe_154m.py',
       'configs/xmoe_154m.py:tiny']) == [
           'configs/sigmoid_154m.py:preset=libmoe,tiny',
           'configs/smoe_154m.py', 'configs/xmoe_154m.py:tiny']
  assert sweep.workdir_name('configs/sigmoid_154m.py:preset=libmoe,tiny',
                            2) == 'sigmoid_154m_preset_libmoe_tiny_seed2'
  assert sweep.workdir_name('configs/smoe_154m.py', 0) == 'smoe_154m_seed0'
  with pytest.raises(ValueError, match='share the workdir'):
    sweep.plan(['configs/smoe_154m.py:tiny'] * 2, 1, 'root')


def test_final_step_reads_config_json(tmp_path):
  assert sweep.final_step(str(tmp_path)) is None
  (tmp_path / 'config.json').write_text(json.dumps(
      {'train': {'steps': 300, 'halt_at_step': 120}}))
  assert sweep.final_step(str(tmp_path)) == 120
  (tmp_path / 'config.json').write_text(json.dumps(
      {'train': {'steps': 300, 'halt_at_step': 0}}))
  assert sweep.final_step(str(tmp_path)) == 300


def test_default_runner_logs_output_and_exit_code(tmp_path):
  log = str(tmp_path / 'sweep.log')
  assert sweep.run_logged([sys.executable, '-c', 'print("hello")'], log) == 0
  code = sweep.run_logged(
      [sys.executable, '-c', 'import sys; sys.exit("boom")'], log)
  assert code == 1
  text = open(log, encoding='utf-8').read()
  assert 'hello' in text and 'boom' in text and text.startswith('$ ')
