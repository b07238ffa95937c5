"""The lmms-eval plugin (eval/lmms/) and the local shapes task
(eval/lmms_tasks/shapes/) on the tiny random LLaVA model.

lmms-eval's simple_evaluate runs the task offline, from a
`datasets.save_to_disk` folder of the shapes set's multiple-choice items,
through the 'moe_jax_vlm' model; its accuracy and its per-option
log-likelihoods must equal the native scorer's (VLMScorer.score_choices /
choice_logprobs) on the same items. Skipped when lmms-eval is not installed
(setup.cfg's `test` extra, installed as the Makefile does).
"""

import importlib.metadata
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

lmms_eval = pytest.importorskip('lmms_eval')

# pylint: disable=g-import-not-at-top,wrong-import-position
from lmms_eval import evaluator
from lmms_eval.api import registry as lmms_registry
from lmms_eval.api.instance import Instance
import lmms_eval.models
from lmms_eval.tasks import TaskManager
import datasets
from PIL import Image

from eval import lmms as lmms_package
from eval import vlm_scorer
from eval.lmms import plugin
from eval.lmms_tasks.shapes import utils as task_utils

REPO = pathlib.Path(__file__).resolve().parents[2]
TASK_DIR = REPO / 'eval' / 'lmms_tasks'
TASK = 'vlm_shapes'
OFFLINE = {'HF_DATASETS_OFFLINE': '1', 'HF_HUB_OFFLINE': '1'}


@pytest.fixture(scope='module')
def dataset_dir(shapes, tmp_path_factory):
  return task_utils.write_dataset(
      shapes.root, tmp_path_factory.mktemp('lmms_shapes') / 'ds')


@pytest.fixture(scope='module')
def lm(scorer):
  return plugin.MoEJaxVLM.from_scorer(scorer)


@pytest.fixture(scope='module')
def results(lm, dataset_dir):
  """simple_evaluate on the local task, offline, samples logged."""
  with pytest.MonkeyPatch.context() as patch:
    for key, value in OFFLINE.items():
      patch.setenv(key, value)
    return evaluator.simple_evaluate(
        model=lm, tasks=[{'task': TASK, 'dataset_path': str(dataset_dir)}],
        task_manager=TaskManager(include_path=str(TASK_DIR),
                                 include_defaults=False),
        log_samples=True, bootstrap_iters=0)


def request(kind, *args):
  return Instance(request_type=kind, arguments=tuple(args), idx=0,
                  metadata={'task': TASK, 'doc_id': 0, 'repeats': 1})


# Registration.


def test_registered_with_lmms_eval():
  assert lmms_eval.models.get_model('moe_jax_vlm') is plugin.MoEJaxVLM
  assert lmms_registry.get_model('moe_jax_vlm') is plugin.MoEJaxVLM
  assert plugin.MoEJaxVLM.is_simple
  manifest, = lmms_package.manifests()
  assert manifest.simple_class_path == 'eval.lmms.plugin.MoEJaxVLM'


def test_entry_point_names_the_manifest():
  points = {p.name: p for p in importlib.metadata.entry_points(
      group='lmms_eval.models')}
  if 'moe_jax_vlm' not in points:
    pytest.skip('the installed moe_jax metadata predates the entry point; '
                "reinstall: pip install --no-deps -e .")
  assert points['moe_jax_vlm'].value == 'eval.lmms:manifests'
  assert points['moe_jax_vlm'].load()() == lmms_package.manifests()


# The local task through simple_evaluate.


def test_simple_evaluate_equals_the_native_scorer(results, scorer, shapes,
                                                  items):
  samples = sorted(results['samples'][TASK], key=lambda s: s['doc_id'])
  assert len(samples) == len(items)
  # The same (question, option) requests as the native scorer's.
  # lmms-eval 0.7.3 logs the arguments flat, without doc_to_visual:
  # (context, continuation, doc_id, task, split) per option.
  for sample, item in zip(samples, items):
    arguments = sample['arguments']
    assert arguments[0::5] == [item['question']] * len(item['options'])
    assert arguments[1::5] == item['options']
    assert sample['target'] == item['options'].index(item['answer'])
  native = scorer.choice_logprobs(items, image_dir=shapes.image_dir)
  # lmms-eval 0.7.3 logs each response as a string '(logprob, greedy)'.
  logged = [[task_utils.response_logprob(r[0]) for r in s['resps']]
            for s in samples]
  np.testing.assert_allclose(np.concatenate(logged), np.concatenate(native),
                             rtol=0, atol=1e-5)
  acc = results['results'][TASK]['acc,none']
  assert acc == pytest.approx(
      scorer.score_choices(items, image_dir=shapes.image_dir))
  assert acc == pytest.approx(np.mean(
      [int(np.argmax(l)) == item['options'].index(item['answer'])
       for l, item in zip(native, items)]))


def test_dataset_folder_holds_the_items(dataset_dir, items, shapes):
  split = datasets.load_from_disk(dataset_dir)['test']
  assert split['question'] == [i['question'] for i in items]
  assert split['label'] == [i['options'].index(i['answer']) for i in items]
  with Image.open(os.path.join(shapes.image_dir, items[0]['image'])) as image:
    np.testing.assert_array_equal(np.asarray(split[0]['image']),
                                  np.asarray(image))


def test_process_results_reads_tuples_and_strings():
  doc = {'id': 'x', 'options': ['a', 'b'], 'label': 1}
  assert task_utils.process_results(doc, [(-2.0, False), (-1.0, True)]) == {
      'acc': 1.0}
  assert task_utils.process_results(doc, ['(-1.0, False)', '(-2.0, True)'])[
      'acc'] == 0.0
  with pytest.raises(ValueError, match="document 'x': 1 responses"):
    task_utils.process_results(doc, [(-1.0, False)])


# The model's API, request by request.


def test_loglikelihood_modes(lm, scorer, shapes, items):
  item = items[0]
  lm.task_dict = {TASK: {'test': [{'image': Image.open(
      os.path.join(shapes.image_dir, item['image']))}]}}
  visual = lambda doc: [doc['image']]
  requests = [request('loglikelihood', item['question'], option, visual, 0,
                      TASK, 'test') for option in item['options']]
  got = lm.loglikelihood(requests)
  want = scorer.choice_logprobs([item], image_dir=shapes.image_dir)[0]
  np.testing.assert_allclose([g[0] for g in got], want, rtol=0, atol=1e-6)
  # A doc_to_target function; the mutual-information (context,
  # continuation) form is scored without an image.
  target = lambda doc: item['options'][0]
  assert lm.loglikelihood([request('loglikelihood', item['question'], target,
                                   visual, 0, TASK, 'test')])[0] == got[0]
  assert lm.loglikelihood([request('loglikelihood', item['question'],
                                   'red')])[0] == scorer.loglikelihood(
                                       [(None, item['question'], 'red')])[0]
  # 'loss': lmms-eval's LLaVA convention, the mean -log p per token.
  loss = plugin.MoEJaxVLM.from_scorer(scorer, loglikelihood='loss')
  loss.task_dict = lm.task_dict
  for (value, greedy), (logprob, want_greedy), option in zip(
      loss.loglikelihood(requests), got, item['options']):
    count = len(scorer.tokenizer.encode(option))
    assert value == pytest.approx(-logprob / count)
    assert greedy == want_greedy


def test_generate_until_is_the_scorer_greedy_answer(lm, scorer, shapes,
                                                    items):
  path = os.path.join(shapes.image_dir, items[1]['image'])
  lm.task_dict = {TASK: {'test': [{'image': Image.open(path)}]}}
  visual = lambda doc: [doc['image']]
  got = lm.generate_until([request(
      'generate_until', items[1]['question'],
      {'until': ['\x00never'], 'max_new_tokens': 3, 'temperature': 0,
       'do_sample': False}, visual, 0, TASK, 'test')])
  assert got == scorer.generate([(path, items[1]['question'], 3,
                                  ['\x00never'])])
  with pytest.raises(ValueError, match='greedily only'):
    lm.generate_until([request('generate_until', 'q', {'do_sample': True},
                               visual, 0, TASK, 'test')])


def test_two_images_in_a_document_are_an_error(lm, shapes, items):
  path = os.path.join(shapes.image_dir, items[0]['image'])
  lm.task_dict = {TASK: {'test': [{'image': Image.open(path)}]}}
  two = lambda doc: [doc['image'], doc['image']]
  with pytest.raises(ValueError, match=r"task 'vlm_shapes' document 0: 2 "
                     'visuals'):
    lm.loglikelihood([request('loglikelihood', 'q', 'red', two, 0, TASK,
                              'test')])


@pytest.mark.parametrize('kwargs, message', [
    ({}, 'exactly one of'),
    ({'workdir': 'W', 'step': 'two'}, r'step=.two.: expected an integer'),
    ({'workdir': 'W', 'batch_size': 0}, 'positive'),
])
def test_bad_model_args(kwargs, message):
  with pytest.raises(ValueError, match=message):
    plugin.MoEJaxVLM(**kwargs)


def test_model_args_are_checked(scorer):
  with pytest.raises(ValueError, match="loglikelihood='nll'"):
    plugin.MoEJaxVLM.from_scorer(scorer, loglikelihood='nll')
  with pytest.raises(ValueError, match='come from the given scorer'):
    plugin.MoEJaxVLM(scorer=scorer, step=3)
  # The harness's batch_size (the CLI's default 1) does not clash with the
  # scorer's.
  lm = plugin.MoEJaxVLM.from_scorer(scorer, batch_size=scorer.batch_size,
                                    device='cpu')
  assert lm.batch_size == scorer.batch_size


# A real VLM run through lmms-eval's command line.


@pytest.mark.slow
def test_command_line_on_a_vlm_workdir(tmp_path):
  """2 steps of the tiny SFT stage, then `lmms-eval --model moe_jax_vlm`
  on its shapes items (slow: trains, and lmms-eval starts in a fresh
  process); the CLI's accuracy is the native scorer's."""
  env = dict(os.environ, JAX_PLATFORMS='cpu', **OFFLINE)
  env.pop('XLA_FLAGS', None)
  workdir = tmp_path / 'run'
  proc = subprocess.run(
      [sys.executable, '-m', 'moe_jax.main',
       '--config=configs/vlm/smoe_sft.py:tiny', f'--workdir={workdir}',
       '--config.train.steps=2', '--config.train.warmup_steps=1',
       '--config.train.checkpoint_every=2', '--config.train.eval_every=2'],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  shapes_dir = workdir / 'data' / 'shapes'
  # The YAML's default dataset_path, relative to the CLI's directory.
  task_utils.write_dataset(shapes_dir, tmp_path / 'runs' / 'vlm_shapes_lmms',
                           limit=8)
  out = tmp_path / 'out'
  proc = subprocess.run(
      [os.path.join(os.path.dirname(sys.executable), 'lmms-eval'),
       '--model', 'moe_jax_vlm',
       '--model_args', f'workdir={workdir},batch_size=8',
       '--include_path', str(TASK_DIR), '--tasks', TASK,
       '--output_path', str(out)],
      cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-3000:])
  found = list(out.rglob('*results*.json'))
  assert found, proc.stdout[-2000:]
  acc = json.loads(found[0].read_text())['results'][TASK]['acc,none']
  scorer = vlm_scorer.VLMScorer.from_workdir(str(workdir), batch_size=8)
  items = vlm_scorer.read_items(shapes_dir / 'eval.jsonl')[:8]
  assert acc == pytest.approx(scorer.score_choices(
      items, image_dir=str(shapes_dir)))
