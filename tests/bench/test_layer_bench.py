"""Smoke test: the layer benchmark script runs end to end at a tiny shape."""

import re

from moe_jax.bench import layer as bench_layer


def test_layer_bench_prints_table_and_best_ratio(capsys):
  bench_layer.main(['--tokens', '32', '--d_model', '16', '--num_experts', '4',
                    '--expert_width', '8', '--top_k', '2', '--repeats', '1',
                    '--backends', 'blocked', 'loop'])
  lines = capsys.readouterr().out.strip().splitlines()
  assert any(line.startswith('blocked') for line in lines)
  assert any(line.startswith('loop') for line in lines)
  assert re.fullmatch(r'best_ratio=\d+\.\d\d', lines[-1])
