"""eval/bench.py: the workload counter on hand-built task files, the
Scorer's batching and FLOPs, and a smoke run of the benchmark (tiny model)."""

import json
import math
import pathlib
import re

import numpy as np
import pytest

from eval import bench
from moe_jax import config_lib

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
CONFIGS = REPO_ROOT / 'configs'
LM_EVAL_DATA = (REPO_ROOT / '..' / 'shared' / 'data' / 'lm_eval').resolve()


def words(texts):
  """A hand-checkable token counter: whitespace-separated words."""
  return [len(t.split()) for t in texts]


def write_fixture(root: pathlib.Path) -> pathlib.Path:
  """Two tasks in their on-disk formats: LAMBADA (2 passages), PIQA (2
  items, the second with two identical options)."""
  (root / 'lambada').mkdir(parents=True)
  (root / 'lambada' / 'lambada_test.jsonl').write_text(
      json.dumps({'text': 'the cat sat on the mat'}) + '\n'
      + json.dumps({'text': 'a b c d e f g h i j'}) + '\n', encoding='utf-8')
  (root / 'piqa').mkdir()
  (root / 'piqa' / 'valid.jsonl').write_text(
      json.dumps({'goal': 'open a jar', 'sol1': 'twist the lid',
                  'sol2': 'hit it'}) + '\n'
      + json.dumps({'goal': 'dry', 'sol1': 'towel', 'sol2': 'towel'}) + '\n',
      encoding='utf-8')
  (root / 'piqa' / 'valid-labels.lst').write_text('0\n1\n', encoding='utf-8')
  return root


def test_workload_of_a_two_task_fixture(tmp_path):
  data = write_fixture(tmp_path / 'lm_eval')
  lambada, piqa = bench.task_workloads(str(data), words, prefix_len=1,
                                       names=('lambada', 'piqa'))
  # LAMBADA rows = prefix 1 + context words + ' mat' / ' j' (1 word):
  #   'the cat sat on the' 5 -> 7; 'a b c d e f g h i' 9 -> 11.
  assert (lambada.pairs, lambada.requests) == (2, 2)
  assert lambada.rows.tolist() == [7, 11]
  # PIQA context 'Question: <goal>\nAnswer:': 'open a jar' -> 5 words, with
  # ' twist the lid' (3) -> 9 and ' hit it' (2) -> 8; 'dry' -> 3 words, its
  # two ' towel' options are one distinct pair -> 1 + 3 + 1 = 5.
  assert (piqa.pairs, piqa.requests) == (4, 3)
  assert piqa.rows.tolist() == [9, 8, 5]
  assert lambada.source == piqa.source == 'data'

  # seq_len 8, batches of 2, buckets (4, 8). Inputs = min(row - 1, 8).
  p = bench.pack(lambada.rows, max_len=8, batch_size=2, min_bucket=4)
  # inputs [8 (10 truncated), 6]: one batch at bucket 8.
  assert (p.requests, p.tokens, p.padded_tokens, p.batches) == (
      2, 14, 16, {8: 1})
  p = bench.pack(piqa.rows, max_len=8, batch_size=2, min_bucket=4)
  # inputs [8, 7, 4]: [8, 7] at bucket 8, [4] + a padding row at bucket 4.
  assert (p.requests, p.tokens, p.padded_tokens, p.batches) == (
      3, 19, 2 * 8 + 2 * 4, {4: 1, 8: 1})


def test_estimates_for_absent_tasks(tmp_path):
  data = write_fixture(tmp_path / 'lm_eval')
  assert bench.estimated_counts(['', 'abcd', 'abcde']) == [0, 1, 2]
  hellaswag, = bench.task_workloads(str(data), bench.estimated_counts,
                                    prefix_len=1, names=('hellaswag',))
  assert hellaswag.requests == 10_042 * 4 and hellaswag.source != 'data'
  # Mean ceil(280 / 4) + ceil(110 / 4) = 98 tokens, spread over 0.5-1.5x.
  assert abs(hellaswag.rows.mean() - (1 + 98)) < 0.5
  assert hellaswag.rows.min() == 1 + 49 and hellaswag.rows.max() == 1 + 147
  cbt, = bench.task_workloads(str(data), bench.estimated_counts,
                              prefix_len=1, names=('cbt',))
  assert cbt.requests == 4 * 2_500 * 10


def test_forward_flops_are_a_third_of_train_flops():
  config = config_lib.load_config(str(CONFIGS / 'smoe_154m.py'))
  m = config.model
  n_active = 32_161_792          # moe_jax.flops.active_matmul_params
  for length in (32, 1024):
    expected = (2 * n_active
                + 4 * m.num_layers * m.num_heads * m.head_dim * length)
    assert bench.forward_flops_per_token(config, length) == expected
  assert config.train.seq_len == 1024           # the config is not changed
  packing = bench.Packing(requests=3, tokens=40, padded_tokens=96,
                          batches={32: 1, 64: 1})
  assert packing.flops(config, 1) == (
      32 * bench.forward_flops_per_token(config, 32)
      + 64 * bench.forward_flops_per_token(config, 64))


def test_synthetic_requests_fill_the_buckets():
  requests = bench.synthetic_requests(3, 4, max_len=128, vocab_size=50)
  assert len(set(requests)) == 12
  packing = bench.pack(np.asarray([len(r.context) + len(r.continuation)
                                   for r in requests]),
                       max_len=128, batch_size=4)
  # Buckets (32, 64, 128): three batches, one per bucket.
  assert packing.batches == {32: 1, 64: 1, 128: 1}
  assert all(r.continuation and r.context for r in requests)


def test_bench_main_prints_its_figures(tmp_path, capsys):
  data = write_fixture(tmp_path / 'lm_eval')
  out_json = tmp_path / 'bench.json'
  figures = bench.main([
      f'--config={CONFIGS}/smoe_154m.py:tiny',
      f'--projection_config={CONFIGS}/smoe_154m.py', '--batch_size=8',
      '--max_requests=16', '--repeats=1', f'--data_dir={data}',
      f'--json={out_json}'])
  out = capsys.readouterr().out
  values = dict(line.split('=', 1) for line in out.splitlines()
                if re.fullmatch(r'[a-z_0-9]+=[-+.e\d]+', line))
  for key in ('requests_per_s', 'tokens_per_s', 'compile_s', 'h100_minutes',
              'cpu_minutes', 'workload_requests', 'workload_tokens'):
    assert key in values, key
  assert float(values['requests_per_s']) > 0
  assert float(values['tokens_per_s']) > 0
  assert float(values['h100_minutes']) > 0
  assert '| task | requests | tokens | padded tokens | H100 s | CPU s |' in out
  rows = {line.split('|')[1].strip(): line for line in out.splitlines()
          if line.startswith('| ')}
  assert {'LAMBADA', 'BLiMP', 'CBT', 'HellaSwag', 'PIQA', 'ARC', 'RACE',
          'SIQA', 'CSQA', 'total'} <= set(rows)
  assert rows['PIQA'].rstrip().endswith('data |')
  assert rows['CBT'].rstrip().endswith('estimate* |')
  assert 'ASSUMED MFU 0.3' in out and 'ESTIMATED' in out
  assert '10-minute target' in out
  # The fixture's tasks with the chars / 4 estimate, prefix
  # ceil(len('<STORY_SEP>') / 4) = 3 tokens.
  piqa = next(t for t in figures['tasks'] if t['task'] == 'piqa')
  assert (piqa['pairs'], piqa['requests']) == (4, 3)
  assert figures['prefix_len'] == 3
  saved = json.loads(out_json.read_text())
  assert saved['h100_minutes'] == pytest.approx(figures['h100_minutes'])
  assert saved['measured']['requests'] == 16
  assert math.isclose(saved['total']['requests'],
                      sum(t['requests'] for t in saved['tasks']))


def test_real_task_files_are_counted():
  if not LM_EVAL_DATA.is_dir():
    pytest.skip(f'real task data not found at {LM_EVAL_DATA}')
  workloads = bench.task_workloads(str(LM_EVAL_DATA), bench.estimated_counts,
                                   prefix_len=1)
  by_name = {w.name: w for w in workloads}
  assert list(by_name) == ['lambada', 'blimp', 'cbt', 'hellaswag', 'piqa',
                           'arc', 'race', 'siqa', 'commonsenseqa']
  # Pairs the readers send (a few are repeats the Scorer runs once).
  assert {n: w.pairs for n, w in by_name.items() if w.source == 'data'} == {
      'lambada': 5_153, 'blimp': 134_000, 'piqa': 3_676, 'arc': 14_148,
      'race': 19_736, 'siqa': 5_862, 'commonsenseqa': 6_105}
  for w in workloads:
    assert 0 < w.requests <= w.pairs
