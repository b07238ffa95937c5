"""eval.table: LibMoE's comparison table from hand-written results files.

Every expected number is worked out by hand in the test (mean, sd, the t
quantile, ranks with ties, paired t statistics), not by calling the code's
own helpers.
"""

from __future__ import annotations

import json
import math
import os

import pandas as pd
import pytest

from eval import table

# t_{0.975, 2}: for 2 degrees of freedom the t quantile has the closed form
# t_p = (2p - 1) / sqrt(2 p (1 - p)); p = 0.975 -> 0.95 / sqrt(0.04875).
T_975_DOF2 = 4.302652729749464


def write_result(root, name, *, router, seed, scores, ppl=16.0, step=300,
                 config_name=None, max_examples=100):
  """Writes root/name/eval/step=<step>.json as --mode=eval would."""
  workdir = os.path.join(str(root), name)
  os.makedirs(os.path.join(workdir, 'eval'), exist_ok=True)
  result = {
      'format': 'moe_jax.zero_shot/1', 'workdir': workdir, 'step': step,
      'router': router, 'config_name': config_name or f'{router}_154m:tiny',
      'seed': seed, 'ppl': ppl, 'valid_loss': math.log(ppl) if ppl else None,
      'tasks': {t: {'score': s, 'count': 100, 'rule': 'norm',
                    'groups': {t: {'accuracy': s, 'count': 100}}}
                for t, s in scores.items()},
      'average': sum(scores.values()) / len(scores),
      'max_examples': max_examples, 'seconds': 1.0,
  }
  with open(os.path.join(workdir, 'eval', f'step={step}.json'), 'w',
            encoding='utf-8') as f:
    json.dump(result, f)
  return workdir


def two_methods(root):
  """SMoE seeds 0-2 and σ-MoE seeds 0-3, listed out of seed order.

  piqa: SMoE 0.40, 0.42, 0.47; σ-MoE 0.43, 0.44, 0.52 (+ seed 3: 0.90,
  which SMoE lacks, so it is left out of the paired test). arc is 0.25
  everywhere. PPL: SMoE 16, 17, 18; σ-MoE 15, 16.5, 17 (+ 10).
  """
  smoe = {0: (0.40, 16.0), 1: (0.42, 17.0), 2: (0.47, 18.0)}
  sigmoid = {0: (0.43, 15.0), 1: (0.44, 16.5), 2: (0.52, 17.0),
             3: (0.90, 10.0)}
  workdirs = []
  for seed in (3, 1, 0, 2):
    piqa, ppl = sigmoid[seed]
    workdirs.append(write_result(root, f'sigmoid_seed{seed}',
                                 router='sigmoid', seed=seed, ppl=ppl,
                                 scores={'piqa': piqa, 'arc': 0.25}))
  for seed in (2, 0, 1):
    piqa, ppl = smoe[seed]
    workdirs.append(write_result(root, f'smoe_seed{seed}', router='smoe',
                                 seed=seed, ppl=ppl,
                                 scores={'piqa': piqa, 'arc': 0.25}))
  return workdirs


def test_load_results_one_row_per_run(tmp_path):
  frame = table.load_results(two_methods(tmp_path))
  assert len(frame) == 7
  # Present tasks only, canonical order (piqa before arc).
  assert list(frame.columns[:8]) == ['method', 'seed', 'workdir', 'step',
                                     'ppl', 'piqa', 'arc', 'average']
  row = frame[(frame.method == 'smoe') & (frame.seed == 2)].iloc[0]
  assert row.step == 300 and row.ppl == 18.0 and row.piqa == 0.47
  assert row.average == pytest.approx((0.47 + 0.25) / 2)
  assert row.workdir == str(tmp_path / 'smoe_seed2')


def test_mean_and_confidence_interval_by_hand(tmp_path):
  summary = table.summarise(table.load_results(two_methods(tmp_path)))
  smoe = summary.loc['smoe']
  # 0.40, 0.42, 0.47: mean 1.29 / 3 = 0.43; deviations -0.03, -0.01, 0.04;
  # squares 0.0009 + 0.0001 + 0.0016 = 0.0026; sd = sqrt(0.0026 / 2).
  sd = math.sqrt(0.0013)
  ci = T_975_DOF2 * sd / math.sqrt(3)
  assert smoe.n == 3 and smoe.seeds == '0,1,2'
  assert smoe.piqa_mean == pytest.approx(0.43, abs=1e-12)
  assert smoe.piqa_ci == pytest.approx(ci, rel=1e-9)
  assert ci == pytest.approx(0.089567, abs=1e-6)   # -> '43.00 ± 8.96'
  # Identical scores: CI 0.
  assert smoe.arc_mean == pytest.approx(0.25) and smoe.arc_ci == 0
  # Avg per run = (piqa + 0.25) / 2, so its sd is half of piqa's.
  assert smoe.average_mean == pytest.approx((0.43 + 0.25) / 2)
  assert smoe.average_ci == pytest.approx(ci / 2, rel=1e-9)
  # PPL 16, 17, 18: mean 17, sd 1.
  assert smoe.ppl_mean == pytest.approx(17.0)
  assert smoe.ppl_ci == pytest.approx(T_975_DOF2 / math.sqrt(3), rel=1e-9)


def test_paired_t_test_matches_seeds_by_value(tmp_path):
  summary = table.summarise(table.load_results(two_methods(tmp_path)),
                            baseline='smoe')
  sigmoid = summary.loc['sigmoid']
  assert sigmoid.n == 4 and sigmoid.n_paired == 3
  # Avg differences (seeds 0, 1, 2) = piqa differences / 2 = 0.015, 0.01,
  # 0.025; in units of 0.005: 3, 2, 5. Mean 10/3, deviations -1/3, -4/3,
  # 5/3, sum of squares 42/9, sd = sqrt(7/3);
  # t = (10/3) / (sqrt(7/3) / sqrt(3)) = 10 / sqrt(7).
  # With 2 dof the t CDF is 1/2 + t / (2 sqrt(2 + t^2)), so the two-sided
  # p = 1 - t / sqrt(2 + t^2) = 1 - 10 / sqrt(114).
  assert sigmoid.p_average == pytest.approx(1 - 10 / math.sqrt(114),
                                            rel=1e-9)
  # PPL differences -1, -0.5, -1: mean -5/6, deviations -1/6, 1/3, -1/6,
  # sum of squares 1/6, sd = sqrt(1/12); t = (-5/6) / (sd / sqrt(3)) = -5;
  # p = 1 - 5 / sqrt(27).
  assert sigmoid.p_ppl == pytest.approx(1 - 5 / math.sqrt(27), rel=1e-9)
  # The baseline is first and has no p-value of its own.
  assert list(summary.index) == ['smoe', 'sigmoid']
  assert summary.loc['smoe'].is_baseline
  assert math.isnan(summary.loc['smoe'].p_average)


def test_average_rank_with_a_tie_by_hand(tmp_path):
  # One seed each.            lambada  piqa  arc
  scores = {'smoe':        (0.30, 0.60, 0.25),
            'sigmoid':     (0.20, 0.70, 0.25),
            'deepseek_v3': (0.30, 0.50, 0.25)}
  workdirs = [write_result(tmp_path, router, router=router, seed=0,
                           scores=dict(zip(('lambada', 'piqa', 'arc'), s)))
              for router, s in scores.items()]
  summary = table.summarise(table.load_results(workdirs))
  # lambada: smoe and deepseek_v3 tie for 1-2 -> 1.5 each; sigmoid 3.
  # piqa: sigmoid 1, smoe 2, deepseek_v3 3.  arc: a 3-way tie -> 2 each.
  assert summary.avg_rank['smoe'] == pytest.approx((1.5 + 2 + 2) / 3)
  assert summary.avg_rank['sigmoid'] == pytest.approx((3 + 1 + 2) / 3)
  assert summary.avg_rank['deepseek_v3'] == pytest.approx((1.5 + 3 + 2) / 3)


def test_rank_tie_survives_float_noise_of_the_mean(tmp_path):
  # (0.1 + 0.2) / 2 = 0.15000000000000002 in floats; 0.15 exactly: a tie.
  workdirs = [
      write_result(tmp_path, 'a0', router='smoe', seed=0, scores={'piqa': .1}),
      write_result(tmp_path, 'a1', router='smoe', seed=1, scores={'piqa': .2}),
      write_result(tmp_path, 'b0', router='sigmoid', seed=0,
                   scores={'piqa': .15}),
      write_result(tmp_path, 'b1', router='sigmoid', seed=1,
                   scores={'piqa': .15})]
  summary = table.summarise(table.load_results(workdirs))
  assert list(summary.avg_rank) == [1.5, 1.5]


def test_markdown_table(tmp_path):
  text = table.to_markdown(table.summarise(
      table.load_results(two_methods(tmp_path))))
  caption, header, rule, smoe, sigmoid = [l for l in text.splitlines() if l]
  assert 'step 300' in caption and 'n = ' in caption
  assert 'SMoE 3' in caption and 'σ-MoE 4' in caption   # unequal seeds
  assert 'at most 100 examples' in caption
  # Tasks missing from every run (LAMBADA, ...) are left out.
  assert header == ('| Method | PPL | PIQA | ARC | Avg | Avg rank | '
                    'p Avg vs SMoE | p PPL vs SMoE |')
  assert rule == '|' + '---|' * 8
  cells = [c.strip() for c in smoe.strip('|').split('|')]
  # PPL 17 ± 4.3027 / sqrt(3) = 2.48; piqa 43.00 ± 8.96; arc 25.00 ± 0.00;
  # Avg (43 + 25) / 2 = 34.00 ± 4.48; ranks: piqa 2nd (σ-MoE's mean is
  # (43 + 44 + 52 + 90) / 4 = 57.25), arc tied 1.5 -> (2 + 1.5) / 2 = 1.75.
  assert cells == ['SMoE', '17.00 ± 2.48', '43.00 ± 8.96', '25.00 ± 0.00',
                   '34.00 ± 4.48', '1.75', '–', '–']
  cells = [c.strip() for c in sigmoid.strip('|').split('|')]
  assert cells[0] == 'σ-MoE' and cells[2].startswith('57.25 ± ')
  assert cells[5] == '1.25'
  assert cells[6:] == [f'{1 - 10 / math.sqrt(114):.3f}',
                       f'{1 - 5 / math.sqrt(27):.3f}']


def test_one_seed_shows_no_interval_and_no_p_without_baseline(tmp_path):
  workdirs = [write_result(tmp_path, r, router=r, seed=0,
                           scores={'lambada': 0.1234, 'blimp': 0.5})
              for r in ('sigmoid', 'xmoe')]
  text = table.to_markdown(table.summarise(table.load_results(workdirs)))
  assert '±' not in text and 'p Avg' not in text
  assert '| XMoE | 16.00 | 12.34 | 50.00 | 31.17 | 1.50 |' in text
  assert 'One seed per method' in text


def test_colliding_routers_become_config_methods(tmp_path):
  workdirs = [
      write_result(tmp_path, 'tiny', router='smoe', seed=0,
                   config_name='smoe_154m:tiny', scores={'piqa': 0.5}),
      write_result(tmp_path, 'demo', router='smoe', seed=0,
                   config_name='smoe_154m:demo', scores={'piqa': 0.6}),
      write_result(tmp_path, 'sig', router='sigmoid', seed=0,
                   scores={'piqa': 0.7})]
  frame = table.load_results(workdirs)
  assert list(frame.method) == ['smoe_154m:tiny', 'smoe_154m:demo', 'sigmoid']
  # 'smoe' names two methods now: no baseline, unless named exactly.
  assert not table.summarise(frame).is_baseline.any()
  assert table.summarise(frame, baseline='smoe_154m:demo').index[0] == (
      'smoe_154m:demo')


def test_write_outputs_round_trip(tmp_path):
  frame = table.load_results(two_methods(tmp_path / 'runs'))
  summary = table.summarise(frame)
  out = tmp_path / 'out'
  paths = table.write_outputs(summary, frame, str(out))
  assert sorted(os.listdir(out)) == ['runs.csv', 'table.csv', 'table.md',
                                     'table.png']   # no temporary files left
  assert paths['table.png'] == str(out / 'table.png')
  assert (out / 'table.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  assert (out / 'table.md').read_text() == table.to_markdown(summary)
  back = table.read_summary(str(out / 'table.csv'))
  pd.testing.assert_frame_equal(back, summary, check_dtype=False)
  assert table.to_markdown(back) == table.to_markdown(summary)
  runs = pd.read_csv(out / 'runs.csv')
  assert list(runs.columns) == list(frame.columns)
  pd.testing.assert_series_equal(runs.piqa, frame.piqa)
  assert list(runs.seed) == list(frame.seed)


def test_newest_step_is_read_unless_step_is_given(tmp_path):
  write_result(tmp_path, 'run', router='smoe', seed=0, step=25,
               scores={'piqa': 0.25})
  workdir = write_result(tmp_path, 'run', router='smoe', seed=0, step=100,
                         scores={'piqa': 0.75})
  # 100 > 25 as numbers (not as strings).
  assert table.load_results([workdir]).piqa[0] == 0.75
  assert table.load_results([workdir], step=25).piqa[0] == 0.25
  with pytest.raises(FileNotFoundError, match=r'step=50\.json.*\[25, 100\]'):
    table.load_results([workdir], step=50)


def test_workdir_without_results_says_to_run_eval(tmp_path, capsys):
  (tmp_path / 'untrained').mkdir()
  path = str(tmp_path / 'untrained')
  with pytest.raises(FileNotFoundError) as error:
    table.load_results([path])
  assert os.path.join(path, 'eval') in str(error.value)
  assert '--mode=eval' in str(error.value)
  assert table.main([f'--workdir={path}']) == 2
  err = capsys.readouterr().err
  assert err.count('\n') == 1 and path in err and '--mode=eval' in err
  assert table.main([f'--workdir={tmp_path / "missing"}']) == 2
  assert 'no such run directory' in capsys.readouterr().err


def test_malformed_results_name_the_file_and_field(tmp_path):
  workdir = write_result(tmp_path, 'run', router='smoe', seed=0,
                         scores={'piqa': 0.5})
  path = os.path.join(workdir, 'eval', 'step=300.json')
  with open(path, encoding='utf-8') as f:
    result = json.load(f)
  result['seed'] = None
  with open(path, 'w', encoding='utf-8') as f:
    json.dump(result, f)
  with pytest.raises(ValueError, match=r'step=300\.json: seed: expected'):
    table.load_results([workdir])
  result['seed'], result['format'] = 0, 'other/1'
  with open(path, 'w', encoding='utf-8') as f:
    json.dump(result, f)
  with pytest.raises(ValueError, match=r'step=300\.json: format: expected'):
    table.load_results([workdir])


def test_two_runs_of_one_method_and_seed_are_refused(tmp_path):
  workdirs = [write_result(tmp_path, n, router='smoe', seed=0,
                           scores={'piqa': 0.5}) for n in ('a', 'b')]
  with pytest.raises(ValueError, match="method 'smoe' with seed 0"):
    table.load_results(workdirs)


def test_command_line(tmp_path, capsys):
  workdirs = two_methods(tmp_path / 'runs')
  argv = [f'--workdir={w}' for w in workdirs]
  assert table.main(argv) == 0
  printed = capsys.readouterr().out
  assert '| SMoE | 17.00 ± 2.48 |' in printed
  assert not (tmp_path / 'out').exists()    # files only with --out
  assert table.main(argv + [f'--out={tmp_path / "out"}',
                            '--baseline=sigmoid']) == 0
  assert 'p Avg vs σ-MoE' in capsys.readouterr().out
  assert (tmp_path / 'out' / 'table.png').exists()
  assert table.main(argv + ['--baseline=xmoe']) == 2
  err = capsys.readouterr().err
  assert err.count('\n') == 1 and '--baseline=xmoe' in err
  with pytest.raises(SystemExit) as exit_info:
    table.main([])
  assert exit_info.value.code == 2
