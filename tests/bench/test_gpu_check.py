"""The one-shot GPU check, in its CPU smoke mode, and its report helpers.

The smoke run (about 45 s on 2 cores) goes through every section in its own
subprocess, as on a GPU, with one section made to fail through the test hook:
the failure is recorded, the later sections still run and the exit status is
1. The helpers (JUnit counts, targets, timeouts, section list) are checked on
hand-made inputs.
"""

import json
import subprocess
import sys
import time

import pytest

from moe_jax.bench import gpu_check

SECTIONS = ['kernel_tests', 'kernel_table', 'train_blocked', 'train_pallas',
            'train_ragged_dot', 'memory_660m']


def test_smoke_run_records_each_section_and_goes_on_after_a_failure(
    tmp_path, monkeypatch, capsys):
  # One CPU device in the sections (the suite's conftest asks for 8).
  monkeypatch.setenv('XLA_FLAGS', '')
  monkeypatch.delenv(gpu_check.FAIL_ENV, raising=False)
  start = time.perf_counter()
  rc = gpu_check.main(['--smoke', f'--out={tmp_path}', '--fail=train_pallas'])
  seconds = time.perf_counter() - start
  out = capsys.readouterr().out
  assert rc == 1
  assert seconds < 120, seconds

  report = json.loads((tmp_path / 'gpu_check.json').read_text())
  assert report['complete'] and report['exit_code'] == 1 and report['smoke']
  assert report['device']['platform'] == 'cpu'
  sections = report['sections']
  assert list(sections) == SECTIONS
  status = {name: s['status'] for name, s in sections.items()}
  assert status == {**{name: 'ok' for name in SECTIONS},
                    'train_pallas': 'failed'}
  failed = sections['train_pallas']
  assert 'deliberate failure' in failed['error']
  assert failed['returncode'] == 1 and failed['result'] is None
  for s in sections.values():
    assert s['seconds'] >= 0 and s['timeout_s'] > 0 and s['command']

  tests = sections['kernel_tests']['result']
  assert tests['passed'] >= 3 and tests['failed'] == tests['errors'] == 0
  assert tests['failures'] == []

  table = sections['kernel_table']['result']
  assert [r['shape'] for r in table['rows']] == ['mixtral', 'deepseek_v3_up']
  for row in table['rows']:
    assert set(row['tflops']) == {'gmm', 'dlhs', 'tgmm', 'ragged_dot',
                                  'dense'}
    assert all(v > 0 for v in row['tflops'].values()) and not row['errors']
    assert set(row['tiling']) == {'gmm', 'tgmm'}

  for backend in ('blocked', 'ragged_dot'):
    train = sections[f'train_{backend}']['result']
    assert train['backend'] == backend
    assert train['step_s'] > 0 and train['tokens_per_s'] > 0
    assert 'mfu' not in train  # no peak FLOP/s for a CPU

  memory = sections['memory_660m']['result']
  assert set(memory) == {'none'}
  assert memory['none']['analytic']['total'] > 0
  assert memory['none']['xla']['total'] > 0

  targets = report['targets']
  assert len(targets) == 3
  assert all(t['verdict'].startswith('n/a') for t in targets)

  md = (tmp_path / 'gpu_check.md').read_text()
  for heading in ('## Sections', '## Targets', '## Kernel tests',
                  '## Kernel TFLOP/s', '## 154M SMoE train step',
                  '## Memory fit in 80 GB'):
    assert heading in md
  assert '| train_pallas | failed |' in md
  assert '| mixtral | 256 | 64 | 224 | 8 |' in md
  assert '| blocked |' in md and '| pallas | - | - | - | failed |' in md
  assert '| none |' in md

  log = (tmp_path / 'gpu_check.log').read_text()
  assert all(f'===== {name} ' in log for name in SECTIONS)
  assert sorted(p.name for p in tmp_path.iterdir()) == [
      'gpu_check.json', 'gpu_check.log', 'gpu_check.md']
  assert 'failed or timed out: train_pallas' in out
  assert 'n/a (no GPU: cpu)' in out


def test_importing_the_check_starts_no_jax_backend():
  """The parent must hold no GPU memory while its sections run."""
  code = ('from moe_jax.bench import gpu_check\n'
          'from jax._src import xla_bridge\n'
          'assert not xla_bridge.backends_are_initialized()\n')
  subprocess.run([sys.executable, '-c', code], check=True,
                 cwd=gpu_check.REPO)


def test_run_command_kills_a_section_at_its_timeout(tmp_path):
  log = tmp_path / 'log'
  start = time.perf_counter()
  rc, seconds, text = gpu_check.run_command(
      [sys.executable, '-c',
       'import time; print("started", flush=True); time.sleep(60)'],
      str(log), timeout_s=2)
  assert rc is None
  assert 2 <= seconds < 30 and time.perf_counter() - start < 30
  assert 'started' in text and text in log.read_text()


def test_parse_junit_counts_and_first_lines(tmp_path):
  xml = tmp_path / 'junit.xml'
  xml.write_text(
      '<?xml version="1.0"?><testsuites><testsuite name="pytest" errors="1" '
      'failures="1" skipped="1" tests="5">'
      '<testcase classname="tests.kernels.test_gmm" name="test_a"/>'
      '<testcase classname="tests.kernels.test_gmm" name="test_b"/>'
      '<testcase classname="tests.kernels.test_gmm" name="test_c">'
      '<failure message="AssertionError: not close&#10;more">trace'
      '</failure></testcase>'
      '<testcase classname="tests.kernels.test_gmm" name="test_d">'
      '<error message="failed on setup">trace</error></testcase>'
      '<testcase classname="tests.kernels.test_gmm" name="test_e">'
      '<skipped message="needs a GPU"/></testcase>'
      '</testsuite></testsuites>')
  result = gpu_check.parse_junit(str(xml))
  assert (result['passed'], result['failed'], result['errors'],
          result['skipped']) == (2, 1, 1, 1)
  assert result['failures'] == [
      {'test': 'tests.kernels.test_gmm::test_c', 'kind': 'failure',
       'message': 'AssertionError: not close'},
      {'test': 'tests.kernels.test_gmm::test_d', 'kind': 'error',
       'message': 'failed on setup'}]


def _sections(platform, gmm, tgmm, mfus):
  device = {'platform': platform}
  sections = {'kernel_table': {'result': {'device': device, 'rows': [
      {'shape': 'deepseek_v3_up', 'tflops': {'gmm': 999.0, 'tgmm': 999.0}},
      {'shape': 'mixtral', 'tflops': {'gmm': gmm, 'tgmm': tgmm}}]}}}
  for backend, mfu in mfus.items():
    result = {'device': device} | ({} if mfu is None else {'mfu': mfu})
    sections[f'train_{backend}'] = {'result': result}
  return sections


def test_targets_pass_miss_and_not_measured():
  targets = gpu_check.evaluate_targets(_sections(
      'gpu', 650.0, 400.0, {'blocked': 0.3, 'pallas': 0.5,
                            'ragged_dot': None}))
  assert [t['verdict'] for t in targets] == ['PASS', 'MISS', 'PASS']
  assert [t['value'] for t in targets] == [650.0, 400.0, 0.5]
  assert 'best backend: pallas' in targets[2]['target']
  # Exactly at the target passes; a failed section is not measured.
  targets = gpu_check.evaluate_targets(_sections(
      'gpu', 600.0, None, {'blocked': 0.44}))
  assert [t['verdict'] for t in targets] == [
      'PASS', 'n/a (not measured)', 'MISS']
  targets = gpu_check.evaluate_targets(_sections('cpu', 1.0, 1.0, {}))
  assert [t['verdict'] for t in targets] == [
      'n/a (no GPU: cpu)', 'n/a (no GPU: cpu)', 'n/a (not measured)']
  assert gpu_check.evaluate_targets({})[0]['verdict'] == 'n/a (not measured)'


def test_sections_hooks_and_a_missing_memory_module(tmp_path, monkeypatch):
  sections = gpu_check.build_sections(gpu_check.FULL, False, str(tmp_path),
                                      set())
  assert [s.name for s in sections] == SECTIONS
  assert set(gpu_check.SHARES) == set(SECTIONS)
  assert sum(gpu_check.SHARES.values()) == pytest.approx(1.0)
  assert not any(s.skip for s in sections)
  tests = sections[0].command
  assert tests[1:3] == ['-m', 'pytest'] and 'gpu or not gpu' in tests
  assert tests[-1] == 'tests/kernels'
  assert sections[-1].shown == ('python -m moe_jax.bench.memory '
                                '--config=configs/smoe_660m.py --hbm_gb=80')

  monkeypatch.setattr(gpu_check, 'MEMORY_MODULE', 'moe_jax.bench.no_such')
  sections = gpu_check.build_sections(
      gpu_check.FULL, False, str(tmp_path), {'kernel_table'},
      only={'kernel_table', 'train_pallas'})
  skips = {s.name: s.skip for s in sections}
  assert skips == {'kernel_tests': 'skipped: not in --only',
                   'kernel_table': None, 'train_blocked':
                   'skipped: not in --only', 'train_pallas': None,
                   'train_ragged_dot': 'skipped: not in --only',
                   'memory_660m': 'skipped: not in --only'}
  assert 'deliberate failure' in sections[1].command[-1]
  sections = gpu_check.build_sections(gpu_check.FULL, False, str(tmp_path),
                                      set())
  assert sections[-1].skip == 'skipped: moe_jax.bench.no_such not found'
  with pytest.raises(ValueError, match='--fail: unknown sections'):
    gpu_check.build_sections(gpu_check.FULL, False, str(tmp_path), {'nope'})


def test_parse_progress_of_a_run_cut_short():
  text = ('===== kernel_tests (timeout 120 s): python -m pytest ...\n'
          + '..F.s' + '.' * 60 + ' [ 40%]\n' + '.E.x\n')
  result = gpu_check.parse_progress(text)
  assert (result['passed'], result['failed'], result['errors'],
          result['skipped']) == (65, 1, 1, 2)
  assert result['partial']
  assert gpu_check.parse_progress('Traceback\nImportError: x\n') is None
