"""Documents, prompts and scoring of the lmms-eval task `vlm_shapes`.

The documents are the multiple-choice items of the tiny shapes set
(moe_jax/data/tiny_vlm.py eval.jsonl: {id, image, question, options,
answer}), saved by `write_dataset` as a datasets folder with one split
'test' and the columns id, image (datasets.Image), question, options,
answer and label (the answer's index in options):

  python -m eval.lmms_tasks.shapes.utils --shapes_dir=S --out=D

lmms-eval imports this file by path (the YAML's `!function utils.*`), so it
imports nothing of moe_jax.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
from typing import Any, Sequence

import numpy as np

SPLIT = 'test'


def read_items(eval_jsonl: str | os.PathLike) -> list[dict[str, Any]]:
  """The items of an eval.jsonl file, with each answer's option index
  under 'label'; an error names the line whose answer is not an option."""
  items = []
  with open(eval_jsonl, encoding='utf-8') as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      item = json.loads(line)
      options = list(item['options'])
      answer = item['answer']
      if isinstance(answer, int) and not isinstance(answer, bool):
        label = answer
      elif answer in options:
        label = options.index(answer)
      else:
        raise ValueError(f'{eval_jsonl}:{n}: answer {answer!r} is not one of '
                         f'the options {options}')
      if not 0 <= label < len(options):
        raise ValueError(f'{eval_jsonl}:{n}: answer index {label} out of '
                         f'range for {len(options)} options')
      items.append(dict(item, label=label))
  return items


def write_dataset(shapes_dir: str | os.PathLike, out_dir: str | os.PathLike,
                  *, limit: int | None = None) -> str:
  """The shapes set's eval.jsonl (images relative to shapes_dir) as a
  `datasets.save_to_disk` folder for the task (dataset_path = out_dir).

  Args:
    shapes_dir: a set written by tiny_vlm.write_shapes_dataset.
    out_dir: the folder to write (replaced when it exists).
    limit: keep the first `limit` items.

  Returns:
    out_dir.
  """
  import datasets  # pylint: disable=g-import-not-at-top
  shapes_dir = os.fspath(shapes_dir)
  items = read_items(os.path.join(shapes_dir, 'eval.jsonl'))[:limit]
  if not items:
    raise ValueError(f'{shapes_dir}/eval.jsonl: no items')
  for item in items:
    path = os.path.join(shapes_dir, item['image'])
    if not os.path.isfile(path):
      raise FileNotFoundError(f'item {item.get("id")!r}: no image {path}')
  features = datasets.Features({
      'id': datasets.Value('string'), 'image': datasets.Image(),
      'question': datasets.Value('string'),
      'options': datasets.Sequence(datasets.Value('string')),
      'answer': datasets.Value('string'), 'label': datasets.Value('int64')})
  table = {
      'id': [str(i.get('id', k)) for k, i in enumerate(items)],
      'image': [os.path.join(shapes_dir, i['image']) for i in items],
      'question': [i['question'] for i in items],
      'options': [list(i['options']) for i in items],
      'answer': [str(i['answer']) for i in items],
      'label': [i['label'] for i in items]}
  dataset = datasets.Dataset.from_dict(table, features=features)
  out_dir = os.fspath(out_dir)
  # Images are embedded, so the folder stands alone.
  datasets.DatasetDict({SPLIT: dataset}).save_to_disk(out_dir)
  return out_dir


# The YAML's functions.


def doc_to_visual(doc: dict[str, Any]) -> list:
  """The document's image, as decoded by datasets (a PIL image)."""
  return [doc['image']]


def doc_to_text(doc: dict[str, Any], lmms_eval_specific_kwargs=None) -> str:
  """The question alone; the model's template adds roles and the image."""
  del lmms_eval_specific_kwargs
  return doc['question']


def doc_to_choice(doc: dict[str, Any]) -> list[str]:
  return list(doc['options'])


def response_logprob(result: Any) -> float:
  """The logprob of one option's response: a (logprob, is_greedy) pair,
  or the string lmms-eval 0.7.3 makes of it (its evaluator passes every
  response through unwrap_generation_output, which str()s tuples)."""
  if isinstance(result, str):
    result = ast.literal_eval(result)
  if isinstance(result, (list, tuple)):
    result = result[0]
  return float(result)


def process_results(doc: dict[str, Any], results: Sequence[Any]
                    ) -> dict[str, float]:
  """acc: the option with the highest summed log-probability (the first of
  equal ones) is the document's label. Expects the plugin's default
  loglikelihood='logprob'."""
  lls = [response_logprob(r) for r in results]
  if len(lls) != len(doc['options']):
    raise ValueError(f'document {doc.get("id")!r}: {len(lls)} responses for '
                     f'{len(doc["options"])} options')
  return {'acc': float(int(np.argmax(lls)) == int(doc['label']))}


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=write_dataset.__doc__)
  parser.add_argument('--shapes_dir', required=True)
  parser.add_argument('--out', required=True)
  parser.add_argument('--limit', type=int, default=None)
  args = parser.parse_args(argv)
  print(write_dataset(args.shapes_dir, args.out, limit=args.limit))


if __name__ == '__main__':
  main()
