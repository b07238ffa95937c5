"""The layer benchmark over a comma-separated list of token counts."""

from moe_jax.bench import layer as bench_layer


def test_layer_bench_token_list_prints_one_row_per_count(capsys):
  bench_layer.main(['--tokens=8,32', '--d_model', '16', '--num_experts', '4',
                    '--expert_width', '8', '--top_k', '2', '--repeats', '1',
                    '--activation', 'swiglu'])
  lines = capsys.readouterr().out.strip().splitlines()
  rows = [line.split() for line in lines if line.startswith('blocked')]
  assert [int(r[1]) for r in rows] == [8, 32]
  # The last line is the worst case over the token counts.
  worst = max(float(r[-1]) for r in rows)
  assert lines[-1] == f'best_ratio={worst:.2f}'
