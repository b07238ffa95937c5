"""The report builds its figures and summary from traces on disk."""

import json
import os

import numpy as np

from moe_jax import config_lib
from moe_jax import run_log
from moe_jax import trace as trace_lib
from moe_jax.analysis import report
from moe_jax.analysis import tracing

CONFIGS = os.path.join(os.path.dirname(__file__), '..', '..', 'configs')


def _batch(second_choice_of_token0):
  """The 4-token trace of test_metrics as one batch of 2 windows x 2."""
  choice = np.array([[0, second_choice_of_token0], [0, 2], [3, 1], [1, -1]])
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


def test_report_shows_droptop_similarity_and_layer_overlap(tmp_path):
  traces = str(tmp_path / 'traces')
  trace_lib.write_trace(traces, 10, [_batch(1)])
  (tmp_path / 'droptop.json').write_text(json.dumps([
      {'drop': 0, 'name': 'intact', 'loss': 2.0, 'ppl': 7.389,
       'accuracy': 0.5, 'delta_loss': 0.0, 'delta_accuracy': 0.0,
       'step': 10},
      {'drop': 1, 'name': 'DropTop-1', 'loss': 2.3125, 'ppl': 10.10,
       'accuracy': 0.4, 'delta_loss': 0.3125, 'delta_accuracy': -0.1,
       'step': 10}]))
  (tmp_path / 'similarity.json').write_text(json.dumps([
      {'layer': 0, 'ani_w_in': 0.125, 'ani_w_out': 0.0625,
       'ani_router': -0.5, 'cka_mean': 0.8125, 'step': 10}]))
  report.build_report(str(tmp_path), width=4)
  summary = (tmp_path / 'report' / 'summary.md').read_text()
  rows = {line.split('|')[1].strip() + '|' + line.split('|')[2].strip(): line
          for line in summary.splitlines() if line.startswith('|')}
  # The saved tables come back row by row (values unique to them).
  assert '## DropTop (step 10' in summary
  assert '0.3125' in rows['1|DropTop-1'] and '-0.1000' in rows['1|DropTop-1']
  assert '## Expert similarity (step 10)' in summary
  assert '0.8125' in rows['0|0.1250'] and '-0.5000' in rows['0|0.1250']
  # Both layers carry the same trace: intersection 1, Jaccard 1, and
  # selection overlap (2 + 2 + 2 + 1) / (4 tokens x 2 slots) = 0.875.
  assert 'universal score 1.0000' in summary
  assert rows['0-1|1.0000'].split('|')[3].strip() == '0.8750'


def test_comparison_of_two_runs(tmp_path):
  for name, router, second in (('a', 'smoe', 1), ('b', 'xmoe', 2)):
    run = tmp_path / name
    trace_lib.write_trace(str(run / 'traces'), 10, [_batch(second)])
    (run / 'config.json').write_text(json.dumps(
        {'model': {'dense_ffn': False}, 'moe': {'router': router}}))
  out = tmp_path / 'compare'
  report.main(['--workdir', str(tmp_path / 'a'), '--workdir',
               str(tmp_path / 'b'), '--out', str(out)])
  for name in ('compare_frequency.png', 'compare_domain_entropy.png'):
    assert (out / name).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  table = {line.split('|')[1].strip(): [c.strip() for c in line.split('|')]
           for line in (out / 'compare.md').read_text().splitlines()
           if line.startswith('| ')}
  # Columns: run, step, E', allocation_entropy, weight_entropy, margin, CV.
  # Both runs' top-1 histograms are sequence 0 [2, 0, 0, 0] -> 0 and
  # sequence 1 [0, 1, 0, 1] -> 0.5: allocation entropy 0.25.
  assert table['smoe'][4] == table['xmoe'][4] == '0.2500'
  # Margins (test_metrics): run a (.5 + 0 + .2 + 1) / 4 = 0.425; run b's
  # first token has weights .75 / .25 as well: the same 0.425.
  assert table['smoe'][6] == table['xmoe'][6] == '0.4250'
  # Weight entropy of run a: (H(.75,.25) + H(.5,.5) + H(.6,.4) + H(1)) / 4.
  expected = (-(.75 * np.log(.75) + .25 * np.log(.25)) + np.log(2)
              - (.6 * np.log(.6) + .4 * np.log(.4))) / 4
  assert table['smoe'][5] == f'{expected:.4f}'


def _droptop_json(path):
  path.write_text(json.dumps([
      {'drop': 0, 'name': 'intact', 'loss': 2.0, 'ppl': 7.389,
       'accuracy': 0.5, 'delta_loss': 0.0, 'delta_accuracy': 0.0,
       'step': 10}]))


def test_summary_is_built_from_the_section_list(tmp_path):
  trace_lib.write_trace(str(tmp_path / 'traces'), 10, [_batch(1)])
  ctx = report.Context(runs=[report.load_run(str(tmp_path), width=4)],
                       out_dir=str(tmp_path / 'report'))
  summary = tmp_path / 'report' / 'summary.md'

  # No droptop.json: its section has nothing to show and is left out.
  report.build_report(str(tmp_path), width=4)
  assert report.droptop_section(ctx) is None
  assert '## DropTop' not in summary.read_text()
  # One checkpoint: no change rate, and no change_rate.png listed.
  assert report.change_rate_section(ctx) is None
  assert 'change_rate.png' not in summary.read_text()

  # With it, the section's text is in summary.md, in the list's order.
  _droptop_json(tmp_path / 'droptop.json')
  report.build_report(str(tmp_path), width=4)
  text = summary.read_text()
  shown = [s for s in (fn(ctx) for fn in report.SECTIONS) if s is not None]
  assert report.droptop_section in report.SECTIONS
  assert '## DropTop (step 10' in shown[-1].markdown
  offsets = [text.index(s.markdown) for s in shown]
  assert offsets == sorted(offsets) and offsets[0] == 0
  figures = [name for s in shown for name in s.figures]
  assert text.endswith(f"Figures: {', '.join(figures)}.\n")
  for name in figures:
    assert (tmp_path / 'report' / name).stat().st_size > 0, name

  # Another list makes another summary: only its sections are shown.
  report.build_report(str(tmp_path), width=4,
                      sections=[report.header_section, report.droptop_section])
  text = summary.read_text()
  assert text.startswith('# Routing report') and '## DropTop' in text
  assert '## Per-layer metrics' not in text and 'Figures' not in text


def test_router_width_comes_from_the_run_config(tmp_path):
  # TC-MoE's null slots sit at the end of its 2E + N outputs and are rarely
  # chosen: a width inferred from the largest chosen id would drop them.
  config = config_lib.load_config(
      os.path.join(CONFIGS, 'tc_moe_154m.py:tiny'))
  run_log.write_resolved_config(config, str(tmp_path))
  e, n = config.moe.num_experts, config.moe.router_options.num_null
  n = config.moe.top_k if n is None else n
  assert tracing.router_width(str(tmp_path)) == 2 * e + n
  trace_lib.write_trace(str(tmp_path / 'traces'), 10, [_batch(1)])
  assert report.load_run(str(tmp_path)).width == 2 * e + n
  assert report.load_run(str(tmp_path), width=4).width == 4


def test_one_slot_per_token_reports_no_margin(tmp_path):
  tokens, domains, layers = _batch(1)
  layers = [{'choice': l['choice'][:, :1], 'weight': l['weight'][:, :1]}
            for l in layers]
  trace_lib.write_trace(str(tmp_path / 'traces'), 10,
                        [(tokens, domains, layers)])
  report.build_report(str(tmp_path), width=4)
  summary = (tmp_path / 'report' / 'summary.md').read_text()
  table = summary.split('## Per-layer metrics')[1].split('##')[0]
  rows = [[c.strip() for c in line.split('|')[1:-1]]
          for line in table.strip().splitlines()]
  column = rows[0].index('router_margin')
  assert [row[column] for row in rows[2:]] == ['nan', 'nan']
  assert not (tmp_path / 'report' / 'margin.png').exists()


def test_vlm_report_adds_the_position_sensitive_switch_fraction(tmp_path):
  traces = tmp_path / 'traces'
  trace_lib.write_trace(str(traces), 10, [_batch(1)])
  trace_lib.write_trace(str(traces), 20, [_batch(2)])
  layers = [{'layer': l, 'name': f'vision/layer_{l}@scale1', 'site': 'vision',
             'scale': 1, 'width': 4} for l in (0, 1)]
  (traces / 'step=20' / '_layers.json').write_text(json.dumps(layers))
  report.build_report(str(tmp_path))
  summary = (tmp_path / 'report' / 'summary.md').read_text()
  switch = summary.split('Switch fraction')[1].split('##')[0]
  # Token 0's second slot 1 -> 2: one slot position of 8, in both layers.
  rows = [[c.strip() for c in line.split('|')[1:-1]]
          for line in switch.splitlines() if line.startswith('|')]
  assert rows[-1] == ['20', '0.1250', '0.1250']
