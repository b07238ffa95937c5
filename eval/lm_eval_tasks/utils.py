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

The documents are the native evaluator's items (eval/tasks/ readers, the
one place that parses the task files), so lm-eval sees the same questions,
prompts and options in the same order: {context, choices, label} per
multiple-choice item, {context, word} per LAMBADA passage. lm-eval loads
this file from its path; it imports the installed `eval` package.

Run `python eval/lm_eval_tasks/utils.py` to rewrite the 67 BLiMP paradigm
YAMLs and the blimp_local group from the paradigm files found.
"""

from __future__ import annotations

import functools
import glob
import os
import pathlib
from typing import Any

import datasets

from eval import tasks as tasks_lib

ENV = 'MOE_JAX_LM_EVAL_DATA'
HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parents[1]
DEFAULT_DATA_DIR = REPO.parent / 'shared' / 'data' / 'lm_eval'

# local_task -> lm-eval split name. Tasks with subsets (ARC easy/challenge,
# RACE high/middle, BLiMP paradigms) keep one group of the native items.
SPLITS = {'piqa': 'validation', 'siqa': 'validation',
          'commonsenseqa': 'validation', 'arc': 'test', 'race': 'test',
          'blimp': 'test', 'lambada': 'test'}
# Tasks whose options start with a ' ' (LibMoE encodes " " + option; §7's
# table shows it for PIQA and ARC only, LibMoE's siqa.py, race.py and
# commonsenseqa.py have it too): the YAML's target_delimiter holds it, so
# lm-eval's acc_norm counts the option's own characters, as it does for its
# built-in tasks.
DELIMITED = ('piqa', 'arc', 'race', 'siqa', 'commonsenseqa')


def data_dir() -> pathlib.Path:
  """$MOE_JAX_LM_EVAL_DATA, else <repo>/../shared/data/lm_eval."""
  value = os.environ.get(ENV)
  return pathlib.Path(value) if value else DEFAULT_DATA_DIR


@functools.cache
def _items(local_task: str, root: str) -> tuple:
  """The native reader's items of a task under `root`, read once."""
  spec = tasks_lib.TASKS[local_task]
  try:
    return tuple(spec.load(os.path.join(root, spec.subdir)))
  except FileNotFoundError as e:
    raise FileNotFoundError(
        f'{e} For the local lm-eval tasks the folder is named by the '
        f'environment variable {ENV} (now {os.environ.get(ENV)!r}; default '
        f'{DEFAULT_DATA_DIR}).') from None


def _document(local_task: str, item) -> dict[str, Any]:
  if local_task == 'lambada':
    return {'context': item.context, 'word': item.word}
  choices = list(item.options)
  if local_task in DELIMITED:
    if not all(c.startswith(' ') for c in choices):
      raise ValueError(f'{local_task}: expected every option to start with '
                       f"' ' (the target_delimiter), got {choices!r}")
    choices = [c[1:] for c in choices]
  return {'context': item.context, 'choices': choices, 'label': item.label}


def load_docs(local_task: str, local_subset: str | None = None
              ) -> tuple[str, list[dict[str, Any]]]:
  """(split name, documents) of one local task, read from data_dir()."""
  if local_task not in SPLITS:
    raise ValueError(f'dataset_kwargs.local_task={local_task!r}; expected '
                     f'one of {sorted(SPLITS)}')
  items = _items(local_task, str(data_dir()))
  if local_subset is not None:
    items = [item for item in items if item.group == local_subset]
  return SPLITS[local_task], [_document(local_task, i) for i in items]


def blimp_paradigms(root: pathlib.Path | None = None) -> list[str]:
  """The paradigm names (file stems) of blimp/*.jsonl, sorted."""
  root = data_dir() if root is None else root
  return sorted(pathlib.Path(p).stem
                for p in glob.glob(str(root / 'blimp' / '*.jsonl')))


def custom_dataset(local_task: str = '', local_subset: str | None = None,
                   **unused: Any) -> dict[str, datasets.Dataset]:
  """lm-eval's custom_dataset hook: {split: Dataset} of one local task.

  Args:
    local_task: piqa | siqa | commonsenseqa | arc | race | blimp | lambada
      (the YAML's dataset_kwargs).
    local_subset: ARC 'easy'/'challenge', RACE 'high'/'middle', BLiMP the
      paradigm (a group of the native items).
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
