"""Smoke test: the mesh-layout benchmark times a layout against one device."""

import pathlib
import re

from moe_jax.bench import shard as bench_shard

CONFIG = pathlib.Path(__file__).resolve().parents[2] / 'configs'


def test_shard_bench_prints_layouts_and_ratio(capsys):
  bench_shard.main([f'--config={CONFIG}/smoe_154m.py:tiny', '--steps', '1',
                    '--warmup', '0', '--layouts', 'data=2,expert=4'])
  lines = capsys.readouterr().out.strip().splitlines()
  assert [line.split()[0] for line in lines[2:-1]] == ['one_device',
                                                        'data=2,expert=4']
  assert re.fullmatch(r'slowest_ratio=\d+\.\d\d', lines[-1])
