"""The memory benchmark prints XLA's compiled analysis beside its estimate."""

import pathlib
import re

from moe_jax.bench import memory as bench_memory

CONFIG = pathlib.Path(__file__).resolve().parents[2] / 'configs'


def _tiny_parameter_count() -> int:
  """smoe_154m:tiny by hand: V 512, D 64, L 2, 4 heads x 16, E 16, m 16."""
  v, d, layers, e, m = 512, 64, 2, 16, 16
  embeddings = v * d + d * v + v                 # embedding, output + bias
  attention = d * d + d * 2 * d + d * d          # query, key_value, out
  experts = e * d * m + e * m * d                # w_in, w_out (no biases)
  router = d * e
  norms = 2 * 2 * d                              # ln1, ln2: scale, bias
  return embeddings + layers * (attention + experts + router + norms) + 2 * d


def test_prints_both_analyses_per_policy(capsys):
  results = bench_memory.main([f'--config={CONFIG}/smoe_154m.py:tiny',
                               '--remat=none,full', '--devices=1'])
  out = capsys.readouterr().out
  assert f'{_tiny_parameter_count():,} parameters' in out
  for policy in ('none', 'full'):
    block = out.split(f'remat={policy}\n')[1].split('\n\n')[0]
    # The analytic column and XLA's compiled memory analysis, side by side.
    assert re.search(r'parameters\s+\d+\.\d{3}\s+arguments\s+\d+\.\d{3}',
                     block)
    assert re.search(r'total\s+\d+\.\d{3}\s+generated code', block)
    assert re.search(r'temp\s+\d+\.\d{3}', block)
    assert re.search(r'fits in 80 GB: yes \(analytic\), yes \(XLA, cpu\)',
                     block)
    estimate, xla = results[policy]['analytic'], results[policy]['xla']
    assert estimate['parameters'] == 4 * _tiny_parameter_count()
    assert estimate['optimizer state (AdamW)'] == 8 * _tiny_parameter_count()
    assert xla['temp'] > 0 and xla['total'] > xla['temp']
    # The per-layer formula reproduces what autodiff keeps (float32 here).
    estimated, traced = results[policy]['residuals']
    assert abs(estimated - traced) / traced < 0.05
  # Remat keeps less, by the estimate, by autodiff and by XLA.
  none, full = results['none'], results['full']
  assert full['analytic']['activations'] < none['analytic']['activations']
  assert full['residuals'][1] < none['residuals'][1] / 3
  assert full['xla']['temp'] < none['xla']['temp']
  assert re.search(r'none\s+grad_accum=1 \(micro-batch 8\)', out)


def test_estimate_without_compiling_and_fit_search(capsys):
  results = bench_memory.main([f'--config={CONFIG}/smoe_154m.py:tiny',
                               '--remat=none', '--no_compile',
                               '--hbm_gb=0.012', '--devices=1'])
  out = capsys.readouterr().out
  assert 'XLA' not in out and results['none']['xla'] is None
  # 14.5 MB at micro-batch 8 does not fit in 12 MB; 2 micro-batches of 4 do
  # (the activations halve, the 3.3 MB of parameters, moments and
  # gradients stay).
  assert 'fits in 0.012 GB: no (analytic)' in out
  assert results['none']['analytic']['total'] > 0.012e9
  assert results['none']['fewest_grad_accum'] == 2
  assert re.search(r'none\s+grad_accum=2 \(micro-batch 4\)', out)
