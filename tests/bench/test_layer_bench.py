"""Smoke test: the layer benchmark script runs end to end at a tiny shape."""

import re

import jax
import numpy as np
import pytest

from moe_jax.bench import layer as bench_layer
from moe_jax.moe import experts as experts_lib


def test_layer_bench_prints_table_and_best_ratio(capsys):
  bench_layer.main(['--tokens', '32', '--d_model', '16', '--num_experts', '4',
                    '--expert_width', '8', '--top_k', '2', '--repeats', '1',
                    '--backends', 'blocked', 'loop'])
  lines = capsys.readouterr().out.strip().splitlines()
  assert any(line.startswith('blocked') for line in lines)
  assert any(line.startswith('loop') for line in lines)
  assert re.fullmatch(r'best_ratio=\d+\.\d\d', lines[-1])


@pytest.mark.parametrize('activation', ['relu', 'swiglu'])
def test_floor_grads_equal_autodiff_of_the_batched_ffn(activation):
  # The floor row times a hand-written backward: it must compute the same
  # gradients as autodiff of the expert FFN it stands for.
  e, c, d, f = 3, 5, 8, 6
  shapes = experts_lib.ffn_param_shapes(e, d, f, activation)
  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  params = {'w_in': jax.random.normal(keys[0], shapes['w_in']),
            'w_out': jax.random.normal(keys[1], shapes['w_out'])}
  xb = jax.random.normal(keys[2], (e, c, d))
  dy = jax.random.normal(keys[3], (e, c, d))
  ffn = lambda p, x: experts_lib.batched_ffn(p, x, activation=activation)
  _, vjp = jax.vjp(ffn, params, xb)
  want_params, want_x = vjp(dy)
  got_params, got_x = bench_layer.floor_grads(params, xb, dy, activation)
  np.testing.assert_allclose(got_x, want_x, rtol=1e-5, atol=1e-5)
  for name in ('w_in', 'w_out'):
    np.testing.assert_allclose(got_params[name], want_params[name],
                               rtol=1e-5, atol=1e-5)


def test_layer_bench_prints_a_floor_row_per_token_count(capsys):
  bench_layer.main(['--tokens=8,32', '--d_model', '16', '--num_experts', '4',
                    '--expert_width', '8', '--top_k', '2', '--repeats', '1'])
  rows = [line.split() for line in capsys.readouterr().out.splitlines()
          if line.startswith('floor')]
  assert [int(r[1]) for r in rows] == [8, 32]
