"""Smoke test: the import / export benchmark runs at 2e7 parameters and
prints its figures."""

import re

from moe_jax.bench import convert as bench_convert


def test_shape_ladder_hits_the_target():
  shape = bench_convert.llama_shape(1e9)
  assert (shape['D'], shape['L'], shape['I'], shape['K']) == (2048, 19,
                                                               5632, 8)
  assert abs(shape['params'] - 1e9) / 1e9 < 0.05
  small = bench_convert.llama_shape(2e7)
  assert small['D'] == 256 and abs(small['params'] - 2e7) / 2e7 < 0.05


def test_convert_bench_prints_seconds_and_peak_memory(capsys, tmp_path):
  bench_convert.main(['--params=2e7', '--repeats=1',
                      f'--tmp_dir={tmp_path}'])
  out = capsys.readouterr().out
  figures = dict(line.split('=', 1) for line in out.splitlines()
                 if re.fullmatch(r'[a-z_]+=[-+.e\d]+', line))
  assert int(figures['params']) == 20_155_136
  for phase in ('import', 'export'):
    assert float(figures[f'{phase}_s']) > 0
    # Python + jax alone take over 100 MiB; the model adds its 80 MB.
    assert 100 < float(figures[f'{phase}_peak_rss_mib']) < 4096
    assert re.search(rf'^{phase}: [\d.]+ s median of 1 .* peak RSS [\d.]+ '
                     'GiB', out, re.M)
  # The temporary checkpoint is removed.
  assert not list(tmp_path.iterdir())
