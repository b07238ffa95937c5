"""Routing traces (moe_jax/trace.py): hand-built batches round-trip exactly."""

import numpy as np
import pytest

from moe_jax import trace as trace_lib


def _batches():
  """Two batches of B=2 windows x S=3 tokens, 2 layers, K=2 slots, E'=3."""
  tokens = [np.array([[5, 6, 7], [8, 9, 10]]), np.array([[1, 2, 3], [4, 5, 6]])]
  domains = [np.array([0, 2]), np.array([1, 1])]
  out = []
  for b in range(2):
    layers = []
    for layer in range(2):
      base = 10 * b + layer
      choice = (np.arange(12).reshape(6, 2) + base) % 3
      weight = np.full((6, 2), 0.25 + base, np.float32)
      probs = np.full((6, 3), 1 / 3, np.float32)
      layers.append({'choice': choice, 'weight': weight, 'probs': probs})
    out.append((tokens[b], domains[b], layers))
  return out


def test_trace_round_trip_by_hand(tmp_path):
  summary = trace_lib.write_trace(str(tmp_path), 7, _batches())
  assert summary == {'rows': 2 * 2 * 2 * 3, 'layers': 2,
                     'path': str(tmp_path / 'step=7')}
  frame = trace_lib.read_trace(str(tmp_path), layer=1)
  assert len(frame) == 12
  frame = frame.sort_values(['sequence', 'position']).reset_index(drop=True)
  # Sequences number on across batches; positions restart per window.
  assert list(frame['sequence']) == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
  assert list(frame['position']) == [0, 1, 2] * 4
  assert list(frame['token']) == [5, 6, 7, 8, 9, 10, 1, 2, 3, 4, 5, 6]
  assert list(frame['domain']) == [0, 0, 0, 2, 2, 2, 1, 1, 1, 1, 1, 1]
  # Layer 1 of batch 0: choice (2t + j + 1) mod 3, weight 1.25.
  np.testing.assert_array_equal(frame['choice_0'][:6], [1, 0, 2, 1, 0, 2])
  np.testing.assert_array_equal(frame['choice_1'][:6], [2, 1, 0, 2, 1, 0])
  np.testing.assert_allclose(frame['weight_0'][:6], 1.25)
  np.testing.assert_allclose(frame['weight_1'][6:], 11.25)
  assert {str(v) for v in frame['step']} == {'7'}
  np.testing.assert_allclose(frame['prob_2'], 1 / 3, rtol=1e-3)   # float16


def test_retrace_replaces_a_step_and_keeps_others(tmp_path):
  trace_lib.write_trace(str(tmp_path), 1, _batches())
  trace_lib.write_trace(str(tmp_path), 2, _batches()[:1])
  trace_lib.write_trace(str(tmp_path), 2, _batches())
  assert len(trace_lib.read_trace(str(tmp_path), step=1)) == 24
  assert len(trace_lib.read_trace(str(tmp_path), step=2)) == 24
  assert sorted(p.name for p in tmp_path.iterdir()) == ['step=1', 'step=2']


def test_empty_evaluation_set_is_an_error(tmp_path):
  with pytest.raises(ValueError, match='eval_batches'):
    trace_lib.write_trace(str(tmp_path), 1, [])
