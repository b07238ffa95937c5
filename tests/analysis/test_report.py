"""The report builds its figures and summary from traces on disk."""

import numpy as np

from moe_jax import trace as trace_lib
from moe_jax.analysis import report


def _batch(second_choice_of_token0):
  """The 4-token trace of test_metrics as one batch of 2 windows x 2."""
  choice = np.array([[0, second_choice_of_token0], [0, 2], [3, 1], [1, 3]])
  weight = np.array([[.75, .25], [.5, .5], [.6, .4], [1., 0.]], np.float32)
  layers = [{'choice': choice, 'weight': weight}] * 2
  return np.array([[11, 12], [13, 14]]), np.array([0, 1]), layers


def test_report_from_two_traced_checkpoints(tmp_path):
  traces = str(tmp_path / 'traces')
  trace_lib.write_trace(traces, 10, [_batch(1)])
  trace_lib.write_trace(traces, 20, [_batch(2)])
  result = report.build_report(str(tmp_path), width=4)
  assert result['layers'] == [0, 1] and result['steps'] == [10, 20]
  for name in ('frequency.png', 'domain_entropy.png', 'margin.png',
               'change_rate.png', 'summary.md'):
    path = tmp_path / 'report' / name
    assert path.stat().st_size > 0, name
    if name.endswith('.png'):
      assert path.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  summary = (tmp_path / 'report' / 'summary.md').read_text()
  # One of the 7 (token, expert) pairs changed between the checkpoints:
  # 100 - 100 * 6/7 = 14.29 %, in both layers.
  assert summary.count('14.29') == 2
  # Step 20's allocation entropy: sequence 0 top-1 [2, 0, 0, 0] -> 0,
  # sequence 1 [0, 1, 0, 1] -> 0.5; mean 0.25.
  assert '0.2500' in summary


def test_report_without_traces_says_how_to_make_them(tmp_path):
  try:
    report.build_report(str(tmp_path))
  except FileNotFoundError as e:
    assert '--mode=trace' in str(e)
  else:
    raise AssertionError('no error without traces')
