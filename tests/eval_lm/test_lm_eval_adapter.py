"""The lm-eval adapter (eval/lm_eval_adapter.py) and the offline local tasks
(eval/lm_eval_tasks/) on a real 2-step checkpoint of the tiny SMoE config.

lm-eval and the native LibMoE-rule evaluator must see the same items, the
same (context, continuation) strings and the same token sequences, so that
lm-eval's per-option log-likelihoods equal the native scorer's (to float
rounding of different batch layouts) and lm-eval's acc equals the
first-maximum accuracy of the native log-likelihoods. Everything runs
offline; the tasks need ../shared/data/lm_eval (skipped without it).
"""

import importlib.util
import os
import pathlib
import subprocess
import sys

import jax
import lm_eval
from lm_eval.api import registry
from lm_eval.api.instance import Instance
from lm_eval import utils as lm_eval_utils
from lm_eval.tasks import TaskManager
import numpy as np
import pytest

from eval import lm_eval_adapter
from eval import lm_eval_compare
from eval import multiple_choice as mc
from eval import tasks as tasks_lib
from eval import text_scorer as text_scorer_lib
from moe_jax import restore
from moe_jax import run_log
from moe_jax import scoring

REPO = pathlib.Path(__file__).resolve().parents[2]
TASK_DIR = REPO / 'eval' / 'lm_eval_tasks'
DATA = pathlib.Path(os.environ.get(lm_eval_compare.DATA_ENV) or
                    REPO.parent / 'shared' / 'data' / 'lm_eval')
LIMIT = 8
BATCH = 8     # rows per batch; a multiple of the suite's 8 CPU devices
TASKS = ['piqa_local', 'arc_local', 'siqa_local', 'commonsenseqa_local',
         'race_local', 'blimp_local_adjunct_island', 'blimp_local_wh_island',
         'lambada_local']
LEAVES = ['piqa_local', 'arc_easy_local', 'arc_challenge_local', 'siqa_local',
          'commonsenseqa_local', 'race_high_local', 'race_middle_local',
          'blimp_local_adjunct_island', 'blimp_local_wh_island',
          'lambada_local']
OFFLINE = {'HF_DATASETS_OFFLINE': '1', 'HF_HUB_OFFLINE': '1'}
needs_data = pytest.mark.skipif(
    not (DATA / 'piqa' / 'valid.jsonl').is_file(),
    reason=f'no lm-eval task data at {DATA} (set '
    f'{lm_eval_compare.DATA_ENV})')


def environment():
  env = dict(os.environ, JAX_PLATFORMS='cpu', **OFFLINE)
  env.pop('XLA_FLAGS', None)
  return env


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  """A 2-step tiny SMoE run with a checkpoint at step 2 (about 10 s)."""
  workdir = tmp_path_factory.mktemp('lm_eval') / 'run'
  proc = subprocess.run(
      [sys.executable, '-m', 'moe_jax.main',
       '--config=configs/smoe_154m.py:tiny', f'--workdir={workdir}',
       '--config.train.steps=2', '--config.train.checkpoint_every=2',
       '--config.train.eval_every=2'],
      cwd=REPO, env=environment(), capture_output=True, text=True,
      timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir


@pytest.fixture(scope='module')
def text_scorer(workdir):
  return text_scorer_lib.TextScorer.from_workdir(str(workdir),
                                                 batch_size=BATCH,
                                                 progress=False)


@pytest.fixture(scope='module')
def lm(text_scorer):
  return lm_eval_adapter.MoEJaxLM.from_text_scorer(text_scorer)


@pytest.fixture(scope='module')
def results(lm):
  """simple_evaluate on the local tasks, offline, samples logged."""
  if not (DATA / 'piqa' / 'valid.jsonl').is_file():
    pytest.skip(f'no lm-eval task data at {DATA}')
  with pytest.MonkeyPatch.context() as patch:
    for key, value in OFFLINE.items():
      patch.setenv(key, value)
    patch.setenv(lm_eval_compare.DATA_ENV, str(DATA))
    return lm_eval.simple_evaluate(
        model=lm, tasks=TASKS, limit=LIMIT, log_samples=True,
        bootstrap_iters=0,
        task_manager=TaskManager(include_path=str(TASK_DIR),
                                 include_defaults=False))


def native_items(leaf):
  """The first LIMIT native items (eval/tasks/) of a leaf task's group."""
  native, group = lm_eval_compare.native_source(leaf)
  spec = tasks_lib.TASKS[native]
  items = spec.load(str(DATA / spec.subdir))
  return [i for i in items if i.group == group][:LIMIT]


def request(kind, *args):
  return Instance(request_type=kind, doc={}, arguments=tuple(args), idx=0)


# Registration and construction.


def test_registered_beside_the_builtin_models():
  assert registry.get_model('moe_jax') is lm_eval_adapter.MoEJaxLM
  assert 'hf' in registry.model_registry.keys()


def test_model_args_strings_win_over_the_harness(workdir):
  # The CLI passes batch_size=1 (its default) beside model_args; lm-eval's
  # own merge would raise on the repeated keyword.
  lm = lm_eval_adapter.MoEJaxLM.create_from_arg_string(
      f'workdir={workdir},step=2,batch_size=16,max_len=32,progress=false',
      {'batch_size': 1, 'max_batch_size': None, 'device': 'cpu'})
  assert (lm.text_scorer.step, lm.batch_size, lm.max_length) == (2, 16, 32)
  lm = lm_eval_adapter.MoEJaxLM.create_from_arg_obj(
      {'workdir': str(workdir), 'step': '2', 'progress': False},
      {'batch_size': 'auto'})
  assert lm.batch_size == lm_eval_adapter.DEFAULT_BATCH_SIZE


@pytest.mark.parametrize('kwargs, message', [
    ({}, 'exactly one of'),
    ({'workdir': 'W', 'step': 'two'}, 'step=.two.: expected an integer'),
    ({'workdir': 'W', 'batch_size': 0}, 'positive'),
])
def test_bad_model_args(kwargs, message):
  with pytest.raises(ValueError, match=message):
    lm_eval_adapter.MoEJaxLM(**kwargs)


# Tokenisation: LibMoE's, the native evaluator's.


def test_pairs_encode_like_the_native_scorer(lm, text_scorer):
  pairs = [('Question: Where?\nAnswer:', ' In the box.'),
           ('Article: a b\nQuestion: c\nAnswer:', 'the cat'),
           ('', 'The dog ran.')]
  native = text_scorer.requests(pairs)
  for (context, continuation), req in zip(pairs, native):
    context_enc, continuation_enc = lm._encode_pair(context, continuation)
    assert tuple(context_enc) == req.context
    assert tuple(continuation_enc) == req.continuation
    assert tuple(context_enc[:len(text_scorer.prefix)]) == text_scorer.prefix
  # Trailing whitespace of the context moves into the continuation.
  assert lm._encode_pair('Answer: ', 'yes') == lm._encode_pair('Answer:',
                                                                ' yes')
  assert lm.prefix_token_id == text_scorer.prefix[-1]
  assert lm.eot_token_id == text_scorer.eot_token_id


def test_loglikelihood_is_the_native_score(lm, text_scorer):
  pairs = [('Question: Where?\nAnswer:', ' In the box.'),
           ('', 'The dog ran.')]
  got = lm.loglikelihood([request('loglikelihood', *p) for p in pairs])
  want = text_scorer.loglikelihood(pairs)
  for (logprob, greedy), score in zip(got, want):
    assert logprob == pytest.approx(score.logprob, abs=1e-4)
    assert greedy == score.is_greedy


# simple_evaluate on the local tasks, and agreement with the native rules.


@needs_data
def test_simple_evaluate_runs_offline(results):
  assert list(results['samples']) == LEAVES
  for leaf in LEAVES:
    assert len(results['samples'][leaf]) == LIMIT
    assert 0.0 <= results['results'][leaf]['acc,none'] <= 1.0
  for group, parts in (('arc_local', LEAVES[1:3]),
                       ('race_local', LEAVES[5:7])):
    mean = np.mean([results['results'][p]['acc,none'] for p in parts])
    assert results['results'][group]['acc,none'] == pytest.approx(mean)


@needs_data
@pytest.mark.parametrize('leaf', [l for l in LEAVES if l != 'lambada_local'])
def test_acc_and_loglikelihoods_equal_native(leaf, results, text_scorer):
  items = native_items(leaf)
  samples = sorted(results['samples'][leaf], key=lambda s: s['doc_id'])
  # The YAML prompts give exactly the native (context, option) strings.
  pairs = [(i.context, o) for i in items for o in i.options]
  assert [tuple(a[:2]) for s in samples for a in s['arguments']] == pairs
  assert [s['target'] for s in samples] == [i.label for i in items]
  native = [s.logprob for s in text_scorer.loglikelihood(pairs)]
  lm_lls = [r[0][0] for s in samples for r in s['resps']]
  np.testing.assert_allclose(lm_lls, native, rtol=0, atol=1e-4)
  # lm-eval's acc: argmax of the summed log-probs, the first maximum wins.
  correct, start = [], 0
  for item in items:
    lls = native[start:start + len(item.options)]
    correct.append(int(np.argmax(lls)) == item.label)
    start += len(item.options)
  assert abs(results['results'][leaf]['acc,none'] - np.mean(correct)) <= (
      1e-3)


@needs_data
def test_lambada_is_greedy_equals_native(results, text_scorer):
  items = native_items('lambada_local')
  samples = sorted(results['samples']['lambada_local'],
                   key=lambda s: s['doc_id'])
  pairs = [(i.context, i.continuation) for i in items]
  assert [tuple(s['arguments'][0][:2]) for s in samples] == pairs
  native = text_scorer.loglikelihood(pairs)
  np.testing.assert_allclose([s['resps'][0][0][0] for s in samples],
                             [s.logprob for s in native], rtol=0, atol=1e-4)
  assert results['results']['lambada_local']['acc,none'] == pytest.approx(
      np.mean([s.is_greedy for s in native]))


@needs_data
def test_compare_rows(results, text_scorer):
  native = lm_eval_compare.run_native(
      text_scorer, lm_eval_compare.leaf_tasks(results),
      lm_eval_compare.counts(results), str(DATA))
  rows = {r['task']: r for r in lm_eval_compare.compare(results, native)}
  assert set(rows) == set(LEAVES) | {'arc_local', 'race_local'}
  for row in rows.values():
    assert row['aligned'] and row['max_abs_dll'] < 1e-4, row
    assert row['native_acc'] == pytest.approx(row['lm_acc'], abs=1e-3), row
    if row.get('lm_acc_norm') is not None:
      assert row['native_acc_norm'] == pytest.approx(row['lm_acc_norm'],
                                                     abs=1e-3), row
  # Without ties, LibMoE's rule and the same rule with lm-eval's tie rule
  # agree; the group is the mean of its parts.
  for leaf in ('piqa_local', 'siqa_local', 'race_high_local'):
    if rows[leaf]['ties'] == 0:
      assert rows[leaf]['libmoe'] == rows[leaf]['rule_first_max']
  assert rows['arc_local']['libmoe'] == pytest.approx(np.mean(
      [rows['arc_easy_local']['libmoe'],
       rows['arc_challenge_local']['libmoe']]))
  table = lm_eval_compare.format_table(list(rows.values()))
  assert 'piqa_local' in table and 'lambada_local' in table


# Rolling log-likelihood against a naive forward pass.


def naive_logprob(forward, tokens, num_scored):
  """Sum of log p of the last num_scored tokens, one unpadded forward."""
  logits = forward(np.asarray([tokens[:-1]], np.int32))
  log_probs = np.asarray(jax.nn.log_softmax(logits[0].astype('float32')))
  targets = np.asarray(tokens[1:])
  picked = log_probs[np.arange(len(targets)), targets]
  return float(picked[-num_scored:].sum())


def test_loglikelihood_rolling_equals_naive_forward(lm, text_scorer,
                                                    workdir):
  config = run_log.load_saved_config(str(workdir))
  run = restore.restore_run(config, str(workdir), what='evaluate')
  forward = jax.jit(lambda inputs: scoring.apply_model(
      run.model, run.params, run.router_state, inputs, train=False,
      step=run.step)[0])
  max_len = lm.max_length
  short = 'The cat sat on the mat.'
  words = ('alpha beta gamma delta the of and to in is was for on that '
           'with he it as his at by').split()
  long, count = words[0], 1
  while len(lm.tok_encode(long)) < 5 * max_len // 2:   # 2.5 windows
    long += ' ' + words[count % len(words)]
    count += 1
  short_ids, long_ids = lm.tok_encode(short), lm.tok_encode(long)
  whole = list(text_scorer.prefix) + short_ids
  assert len(whole) <= max_len
  assert 2 * max_len < len(long_ids) < 3 * max_len
  assert len(long_ids) % max_len       # a short last window too
  # Short: the whole prefix + text in one forward.
  want_short = naive_logprob(forward, whole, len(short_ids))
  # Long: lm-eval's own disjoint rolling windows, prefix_token first.
  want_long = 0.0
  for window in lm_eval_utils.get_rolling_token_windows(
      long_ids, lm.prefix_token_id, max_len, 1):
    context, predicted = lm_eval_utils.make_disjoint_window(window)
    want_long += naive_logprob(forward, context + predicted, len(predicted))
  got = lm.loglikelihood_rolling([request('loglikelihood_rolling', short),
                                  request('loglikelihood_rolling', long)])
  assert got == pytest.approx([want_short, want_long], rel=1e-5, abs=1e-3)


# Greedy generation.


def test_generate_until_stops_at_the_until_string(lm, text_scorer):
  context = 'Question: What is the colour of the sky?\nAnswer:'
  free, = lm.generate_until([request(
      'generate_until', context, {'until': [], 'max_gen_toks': 12})])
  assert free == text_scorer.generate([context], max_new_tokens=12)[0]
  if len(free.strip()) < 3:
    pytest.skip(f'the tiny model generated {free!r}; nothing to stop at')
  start = len(free) - len(free.lstrip()) + 1
  stop = free[start:start + 2]
  cut, as_string = lm.generate_until([
      request('generate_until', context, {'until': [stop, '\x00never'],
                                          'max_gen_toks': 12,
                                          'do_sample': False,
                                          'temperature': 0.0}),
      request('generate_until', context, {'until': stop,
                                          'max_gen_toks': 12})])
  assert cut == as_string == free[:free.index(stop)]
  # max_gen_toks is honoured.
  three, = lm.generate_until([request(
      'generate_until', context, {'until': [], 'max_gen_toks': 3})])
  assert three == text_scorer.generate([context], max_new_tokens=3)[0]
  assert free.startswith(three)


@pytest.mark.parametrize('gen_kwargs', [
    {'until': ['\n'], 'do_sample': True},
    {'until': ['\n'], 'temperature': 0.7},
])
def test_generate_until_refuses_sampling(lm, gen_kwargs):
  with pytest.raises(ValueError, match='greedily only'):
    lm.generate_until([request('generate_until', 'Hi', gen_kwargs)])


# The tasks' data folder.


def load_task_utils():
  spec = importlib.util.spec_from_file_location('lm_eval_task_utils',
                                                TASK_DIR / 'utils.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_missing_data_names_the_file_and_the_variable(monkeypatch,
                                                      tmp_path):
  utils = load_task_utils()
  monkeypatch.setenv(utils.ENV, str(tmp_path))
  with pytest.raises(FileNotFoundError,
                     match=r'piqa/valid\.jsonl.*MOE_JAX_LM_EVAL_DATA'):
    utils.custom_dataset(local_task='piqa', version=1.0)
  with pytest.raises(ValueError, match='local_task'):
    utils.custom_dataset(local_task='cbt')


def test_default_data_folder_is_beside_the_repo(monkeypatch):
  utils = load_task_utils()
  monkeypatch.delenv(utils.ENV, raising=False)
  assert utils.data_dir() == REPO.parent / 'shared' / 'data' / 'lm_eval'


@pytest.mark.slow
@needs_data
def test_command_line(workdir, tmp_path):
  """python -m eval.lm_eval_cli: lm-eval's CLI with 'moe_jax' registered
  (slow: lm-eval indexes its built-in tasks, about 10 s)."""
  out = tmp_path / 'out'
  env = dict(environment(), **{lm_eval_compare.DATA_ENV: str(DATA)})
  proc = subprocess.run(
      [sys.executable, '-m', 'eval.lm_eval_cli', '--model', 'moe_jax',
       '--model_args', f'workdir={workdir},batch_size=8,progress=false',
       '--include_path', str(TASK_DIR), '--tasks', 'piqa_local,arc_local',
       '--limit', '2', '--output_path', str(out)],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'piqa_local' in proc.stdout and 'arc_local' in proc.stdout
  assert list(out.rglob('results_*.json'))


def test_target_delimiters_agree_with_the_native_readers():
  """Every task whose native options start with LibMoE's ' ' (PIQA, ARC,
  and, per LibMoE's siqa.py / race.py / commonsenseqa.py, SIQA, RACE and
  CSQA) has target_delimiter " " in its YAML and in lm_eval_compare; the
  others (BLiMP) have ""."""
  import re
  utils = load_task_utils()
  assert set(utils.DELIMITED) == {'piqa', 'arc', 'race', 'siqa',
                                  'commonsenseqa'}
  assert lm_eval_compare.TARGET_DELIMITERS == {
      t: ' ' for t in utils.DELIMITED}
  yamls = {'piqa': 'piqa_local.yaml', 'arc': '_arc_local_template_yaml',
           'race': '_race_local_template_yaml', 'siqa': 'siqa_local.yaml',
           'commonsenseqa': 'commonsenseqa_local.yaml',
           'blimp': '_blimp_local_template_yaml'}
  for task, name in yamls.items():
    text = (TASK_DIR / name).read_text()
    found = re.findall(r'^target_delimiter: "(.*)"$', text, re.M)
    assert found == [' ' if task in utils.DELIMITED else ''], (task, found)
  # The documents hold the option without the delimiter.
  item = mc.Item(
      group='siqa', context='Context: c\nQuestion: q\nAnswer:',
      options=(' yes', ' no'), label=0)
  assert utils._document('siqa', item)['choices'] == ['yes', 'no']
