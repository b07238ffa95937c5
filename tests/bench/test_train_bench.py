"""Smoke test: the train-step benchmark runs for a router and the baseline."""

import pathlib
import re

from moe_jax.bench import train as bench_train

CONFIG = pathlib.Path(__file__).resolve().parents[2] / 'configs'


def test_train_bench_prints_a_row_per_router_and_the_ratio(capsys):
  bench_train.main([f'--config={CONFIG}/deepseek_v3_154m.py:tiny',
                    '--routers', 'smoe', '--steps', '2', '--warmup', '0'])
  lines = capsys.readouterr().out.strip().splitlines()
  rows = {line.split()[0]: line.split() for line in lines[2:-1]}
  assert set(rows) == {'dense', 'smoe'}
  # step ms and tokens/s agree: tokens/s = 8 x 64 / step seconds.
  step_ms, tokens = float(rows['smoe'][2]), float(rows['smoe'][3].replace(',', ''))
  assert abs(tokens - 8 * 64 / (step_ms / 1e3)) / tokens < 0.01
  assert re.fullmatch(r'slowest_ratio=\d+\.\d\d', lines[-1])


def test_trace_bench_prints_rows_per_second(capsys):
  from moe_jax.bench import trace as bench_trace  # pylint: disable=g-import-not-at-top
  bench_trace.main(['--layers', '2', '--windows', '4', '--seq_len', '8',
                    '--repeats', '1'])
  lines = capsys.readouterr().out.strip().splitlines()
  assert lines[0].startswith('repeat 0: 64 rows')
  assert re.fullmatch(r'rows_per_s=\d+', lines[-1])
