"""Offline datasets of the local lm-eval tasks (eval/lm_eval_tasks/*.yaml).

lm-eval 0.4.13 calls `custom_dataset(**metadata, **dataset_kwargs)` instead
of `datasets.load_dataset` when a task YAML names it
(`custom_dataset: !function utils.custom_dataset`). Here it reads LibMoE's
raw benchmark files (shared/data/README.md §1) into `datasets.Dataset`s
built in memory with `Dataset.from_list`, so nothing touches the network or
the Hugging Face cache.

Each document keeps the raw fields the YAML prompts are written over, and
the documents come in the order of the native LibMoE-rule readers
(eval/tasks/), with the same items kept (ARC: canonical AI2 files when
present, else the converted file with padded questions dropped), so that
lm-eval's `--limit N` and the native evaluator's first N items of a group
are the same questions.

Where the files are: the folder named by the environment variable
MOE_JAX_LM_EVAL_DATA, else <repo>/../shared/data/lm_eval. It holds one
folder per task (piqa/, siqa/, commonsenseqa/, arc/, race/, blimp/,
lambada/).

This file is loaded by lm-eval from its path (not as part of the `eval`
package), so it imports nothing of the project.

Run `python eval/lm_eval_tasks/utils.py` to rewrite the 67 BLiMP paradigm
YAMLs and the blimp_local group from the paradigm files found.
"""

from __future__ import annotations

import glob
import json
import os
import pathlib
from typing import Any, Iterator

import datasets

ENV = 'MOE_JAX_LM_EVAL_DATA'
HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parents[1]
DEFAULT_DATA_DIR = REPO.parent / 'shared' / 'data' / 'lm_eval'

# ARC: subset -> (converted file, canonical AI2 folder); see eval/tasks/arc.py.
ARC_FILES = {
    'easy': ('arc_easy_test.jsonl', 'ARC-Easy'),
    'challenge': ('arc_challenge_test.jsonl', 'ARC-Challenge'),
}
ARC_NUM_CHOICES = 4
RACE_LEVELS = ('high', 'middle')
RACE_LETTERS = ('A', 'B', 'C', 'D')


def data_dir() -> pathlib.Path:
  """$MOE_JAX_LM_EVAL_DATA, else <repo>/../shared/data/lm_eval."""
  value = os.environ.get(ENV)
  return pathlib.Path(value) if value else DEFAULT_DATA_DIR


def _require(path: pathlib.Path | str) -> str:
  """`path` as a string if it is a file, else a FileNotFoundError naming it
  and the environment variable that sets the data folder."""
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f'{path}: lm-eval data file not found. The local lm-eval tasks read '
        f'the folder named by the environment variable {ENV} (now '
        f'{os.environ.get(ENV)!r}; default {DEFAULT_DATA_DIR}), which holds '
        'one folder per task, e.g. <folder>/piqa/valid.jsonl')
  return str(path)


def _jsonl(path: pathlib.Path | str) -> Iterator[dict[str, Any]]:
  """The objects of a JSON-lines file (blank lines skipped)."""
  with open(_require(path), encoding='utf-8') as f:
    for lineno, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        yield json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f'{path} line {lineno}: not valid JSON ({e})') from e


def _labels(path: pathlib.Path | str) -> list[str]:
  with open(_require(path), encoding='utf-8') as f:
    return [line.strip() for line in f if line.strip()]


def _aligned(records: list, labels: list, path, labels_path) -> None:
  if len(records) != len(labels):
    raise ValueError(f'{path} has {len(records)} examples but {labels_path} '
                     f'has {len(labels)} labels; they are aligned line by '
                     'line')


def piqa_docs(root: pathlib.Path) -> list[dict[str, Any]]:
  """{goal, sol1, sol2, label} of piqa/valid.jsonl + valid-labels.lst."""
  path, labels_path = root / 'piqa' / 'valid.jsonl', root / 'piqa' / (
      'valid-labels.lst')
  records, labels = list(_jsonl(path)), _labels(labels_path)
  _aligned(records, labels, path, labels_path)
  return [{'goal': r['goal'], 'sol1': r['sol1'], 'sol2': r['sol2'],
           'label': int(label)} for r, label in zip(records, labels)]


def siqa_docs(root: pathlib.Path) -> list[dict[str, Any]]:
  """{context, question, answerA..C, label 0-2} of siqa/dev.jsonl."""
  path, labels_path = root / 'siqa' / 'dev.jsonl', root / 'siqa' / (
      'dev-labels.lst')
  records, labels = list(_jsonl(path)), _labels(labels_path)
  _aligned(records, labels, path, labels_path)
  return [{'context': r['context'], 'question': r['question'],
           'answerA': r['answerA'], 'answerB': r['answerB'],
           'answerC': r['answerC'], 'label': int(label) - 1}
          for r, label in zip(records, labels)]


def commonsenseqa_docs(root: pathlib.Path) -> list[dict[str, Any]]:
  """{question (the stem), choices (texts in label order), label}."""
  docs = []
  for r in _jsonl(root / 'commonsenseqa' / 'dev_rand_split.jsonl'):
    choices = sorted((c['label'], c['text']) for c in r['question']['choices'])
    labels = [label for label, _ in choices]
    docs.append({'question': r['question']['stem'],
                 'choices': [text for _, text in choices],
                 'label': labels.index(r['answerKey'])})
  return docs


def arc_docs(root: pathlib.Path, subset: str) -> list[dict[str, Any]]:
  """{question (the stem), choices, label} of one ARC test split.

  AI2's canonical file when present (questions without exactly 4 choices
  skipped, as LibMoE does), else the converted file (questions whose
  choices repeat, i.e. padded 3-choice ones, dropped); the same rule as
  eval/tasks/arc.py.
  """
  if subset not in ARC_FILES:
    raise ValueError(f'ARC subset {subset!r}; expected one of '
                     f'{sorted(ARC_FILES)}')
  converted, folder = ARC_FILES[subset]
  task_dir = root / 'arc'
  name = f'{folder}-Test.jsonl'
  canonical = [p for p in (task_dir / name, task_dir / folder / name,
                           task_dir / 'ARC-V1-Feb2018-2' / folder / name)
               if p.is_file()]
  docs = []
  if canonical:
    for r in _jsonl(canonical[0]):
      choices = r['question']['choices']
      if len(choices) != ARC_NUM_CHOICES:
        continue
      docs.append({'question': r['question']['stem'],
                   'choices': [c['text'] for c in choices],
                   'label': [c['label'] for c in choices].index(
                       r['answerKey'])})
    return docs
  prefix = 'Question: '
  path = task_dir / converted
  for r in _jsonl(path):
    choices = r['choices']
    if len(choices) != ARC_NUM_CHOICES or len(set(choices)) != len(choices):
      continue
    if not r['query'].startswith(prefix):
      raise ValueError(f'{path}: query {r["query"][:60]!r} does not start '
                       f'with {prefix!r}')
    docs.append({'question': r['query'][len(prefix):], 'choices': choices,
                 'label': int(r['gold'])})
  return docs


def race_docs(root: pathlib.Path, level: str) -> list[dict[str, Any]]:
  """{article, question, options, label}: one document per question of
  race/test/<level>/*.txt, files in sorted order."""
  if level not in RACE_LEVELS:
    raise ValueError(f'RACE level {level!r}; expected one of {RACE_LEVELS}')
  pattern = str(root / 'race' / 'test' / level / '*.txt')
  paths = sorted(glob.glob(pattern))
  if not paths:
    _require(pattern)
  docs = []
  for path in paths:
    with open(path, encoding='utf-8') as f:
      r = json.load(f)
    for question, options, answer in zip(r['questions'], r['options'],
                                         r['answers'], strict=True):
      docs.append({'article': r['article'], 'question': question,
                   'options': list(options),
                   'label': RACE_LETTERS.index(answer)})
  return docs


def blimp_paradigms(root: pathlib.Path | None = None) -> list[str]:
  """The paradigm names (file stems) of blimp/*.jsonl, sorted."""
  root = data_dir() if root is None else root
  return sorted(pathlib.Path(p).stem
                for p in glob.glob(str(root / 'blimp' / '*.jsonl')))


def blimp_docs(root: pathlib.Path, paradigm: str) -> list[dict[str, Any]]:
  """{sentence_good, sentence_bad} of blimp/<paradigm>.jsonl."""
  return [{'sentence_good': r['sentence_good'],
           'sentence_bad': r['sentence_bad']}
          for r in _jsonl(root / 'blimp' / f'{paradigm}.jsonl')]


def split_last_word(text: str) -> tuple[str, str]:
  """(context, word) as eval/lambada.py splits a LAMBADA passage: the text
  before its last whitespace-delimited word (trailing whitespace removed)
  and that word."""
  parts = text.rstrip().rsplit(None, 1)
  if not parts:
    raise ValueError('empty LAMBADA passage: no last word to predict')
  if len(parts) == 1:
    return '', parts[0]
  return parts[0].rstrip(), parts[1]


def lambada_docs(root: pathlib.Path) -> list[dict[str, Any]]:
  """{text, context, word} of lambada/lambada_test.jsonl."""
  docs = []
  for r in _jsonl(root / 'lambada' / 'lambada_test.jsonl'):
    context, word = split_last_word(r['text'])
    docs.append({'text': r['text'], 'context': context, 'word': word})
  return docs


# local_task -> (split name, reader(root, subset) -> documents)
READERS = {
    'piqa': ('validation', lambda root, _: piqa_docs(root)),
    'siqa': ('validation', lambda root, _: siqa_docs(root)),
    'commonsenseqa': ('validation',
                      lambda root, _: commonsenseqa_docs(root)),
    'arc': ('test', arc_docs),
    'race': ('test', race_docs),
    'blimp': ('test', blimp_docs),
    'lambada': ('test', lambda root, _: lambada_docs(root)),
}


def load_docs(local_task: str, local_subset: str | None = None
              ) -> tuple[str, list[dict[str, Any]]]:
  """(split name, documents) of one local task, read from data_dir()."""
  if local_task not in READERS:
    raise ValueError(f'dataset_kwargs.local_task={local_task!r}; expected '
                     f'one of {sorted(READERS)}')
  split, reader = READERS[local_task]
  return split, reader(data_dir(), local_subset)


def custom_dataset(local_task: str = '', local_subset: str | None = None,
                   **unused: Any) -> dict[str, datasets.Dataset]:
  """lm-eval's custom_dataset hook: {split: Dataset} of one local task.

  Args:
    local_task: piqa | siqa | commonsenseqa | arc | race | blimp | lambada
      (the YAML's dataset_kwargs).
    local_subset: ARC 'easy'/'challenge', RACE 'high'/'middle', BLiMP the
      paradigm.
    **unused: the task's metadata (version; under the CLI also the
      --model_args), which lm-eval passes too.
  """
  del unused
  split, docs = load_docs(local_task, local_subset)
  if not docs:
    raise ValueError(f'{local_task} {local_subset or ""}: no documents read '
                     f'from {data_dir()} (set {ENV})')
  return {split: datasets.Dataset.from_list(docs)}


def write_blimp_yamls(root: pathlib.Path | None = None) -> list[str]:
  """Writes blimp_local_<paradigm>.yaml for every paradigm file and the
  blimp_local group (_blimp_local.yaml); returns the paradigms."""
  paradigms = blimp_paradigms(root)
  if not paradigms:
    raise FileNotFoundError(f'no BLiMP paradigm files under '
                            f'{(root or data_dir()) / "blimp"} (set {ENV})')
  for paradigm in paradigms:
    (HERE / f'blimp_local_{paradigm}.yaml').write_text(
        f'# Written by utils.py (write_blimp_yamls).\n'
        f'include: _blimp_local_template_yaml\n'
        f'task: blimp_local_{paradigm}\n'
        f'dataset_kwargs:\n  local_task: blimp\n  local_subset: {paradigm}\n')
  tasks = ''.join(f'  - blimp_local_{p}\n' for p in paradigms)
  (HERE / '_blimp_local.yaml').write_text(
      '# Written by utils.py (write_blimp_yamls). LibMoE reports BLiMP as the\n'
      '# unweighted mean of the paradigm accuracies (group_average).\n'
      f'group: blimp_local\ntask:\n{tasks}'
      'aggregate_metric_list:\n  - metric: acc\n    aggregation: mean\n'
      '    weight_by_size: false\nmetadata:\n  version: 1.0\n')
  return paradigms


if __name__ == '__main__':
  print(f'wrote {len(write_blimp_yamls())} BLiMP paradigm tasks to {HERE}')
