"""Children's Book Test reader: the original CBTest test files
(algorithms.md §7; Hill et al. 2016, https://arxiv.org/abs/1511.02301).

Files cbtest_{CN,NE,P,V}_test_2500ex.txt, directly in the task folder or
under CBTest/data/ as the CBTest.tgz archive unpacks. An example is 20
numbered context lines, then the query line

  21 <query with XXXXX>\t<answer>\t\t<cand1|cand2|...|cand10>

and a blank line. As LibMoE's language_modeling/framework/dataset/text/
eval/cbt.py (ChildrenBooksTest.process_lines / add_last_lines):
  * every context line (number stripped) and the query text go through
    `detokenize` (ported below) before anything else;
  * the context is the 20 detokenised sentences joined with ' ', then ' '
    and the query up to the blank (the trailing space is dropped here: the
    option is encoded on its own with its word boundary);
  * each option is a candidate followed by the rest of the query line, so
    the option's score covers the words after the blank too;
  * an example without exactly 10 candidates (empty ones dropped) is
    skipped, as LibMoE skips one whose option count is not 10.
Scored by 'sum'; one group per word type (CN common nouns, NE named
entities, P prepositions, V verbs).
"""

from __future__ import annotations

import os

from eval import multiple_choice as mc

DISPLAY = 'CBT'
GROUPS = ('CN', 'NE', 'P', 'V')
BLANK = 'XXXXX'
NUM_CANDIDATES = 10
ARCHIVE_SUBDIR = os.path.join('CBTest', 'data')


# LibMoE's ChildrenBooksTest.detokenize (eval/cbt.py), itself from
# declare-lab/instruct-eval lm_eval/tasks/cbt.py: (old, new) replacements
# that undo the PTB-style spacing of CBTest's text, applied in this order.
_DETOKENIZE = (
    (" '", "'"), (' \n', '\n'), ('\n ', '\n'), (" n't", "n't"),
    ('`` ', '"'), ("''", '"'),
    # punctuation
    (' :', ':'), (' ;', ';'), (' !', '!'), (' ?', '?'), (' ,', ','),
    (' .', '.'),
)


def detokenize(text: str) -> str:
  """CBTest text with LibMoE's detokenisation (_DETOKENIZE) applied."""
  for old, new in _DETOKENIZE:
    text = text.replace(old, new)
  return text


def file_name(group: str) -> str:
  return f'cbtest_{group}_test_2500ex.txt'


def find_file(task_dir: str, group: str) -> str:
  """The group's test file: task_dir/<file> or task_dir/CBTest/data/<file>."""
  paths = [os.path.join(task_dir, file_name(group)),
           os.path.join(task_dir, ARCHIVE_SUBDIR, file_name(group))]
  for path in paths:
    if os.path.isfile(path):
      return path
  raise mc.missing_file(f'{paths[0]} (or {paths[1]})', DISPLAY)


def parse_query(path: str, lineno: int, group: str, sentences: list[str],
                query_line: str) -> mc.Item | None:
  """The item of one example from its context sentences and the text of its
  query line after the line number; None (skipped, as LibMoE does) when it
  has not exactly NUM_CANDIDATES candidates."""
  parts = query_line.split('\t')
  if len(parts) < 3:
    raise mc.line_error(path, lineno, DISPLAY, 'expected a query line '
                        "'<query>\\t<answer>\\t\\t<cand1|...|cand10>'")
  query, answer = detokenize(parts[0]), parts[1].strip()
  candidates = [c.strip() for c in parts[-1].strip().split('|') if c.strip()]
  if query.count(BLANK) != 1:
    raise mc.line_error(path, lineno, DISPLAY, f'the query must hold {BLANK} '
                        f'once, found {query.count(BLANK)}')
  if answer not in candidates:
    raise mc.line_error(path, lineno, DISPLAY, f'answer {answer!r} is not '
                        f'among the candidates {candidates}')
  if len(candidates) != NUM_CANDIDATES:
    return None
  before, after = query.split(BLANK)
  context = (' '.join(detokenize(s) for s in sentences) + ' ' +
             before).rstrip()
  return mc.Item(group=group, context=context,
                 options=tuple(c + after for c in candidates),
                 label=candidates.index(answer))


def parse_file(path: str, group: str) -> list[mc.Item]:
  """The examples of one cbtest_*_test_*.txt file, in file order."""
  items = []
  sentences: list[str] = []
  with open(path, encoding='utf-8') as f:
    for lineno, raw in enumerate(f, start=1):
      line = raw.rstrip('\r\n')
      if not line.strip():
        continue
      number, _, text = line.partition(' ')
      if not number.isdigit():
        raise mc.line_error(path, lineno, DISPLAY, 'expected a line number '
                            f'at the start, got {line[:40]!r}')
      if int(number) != len(sentences) + 1:
        raise mc.line_error(path, lineno, DISPLAY, f'line number {number}; '
                            f'expected {len(sentences) + 1}')
      if '\t' in text:
        item = parse_query(path, lineno, group, sentences, text)
        if item is not None:
          items.append(item)
        sentences = []
      else:
        sentences.append(text.strip())
  if sentences:
    raise ValueError(f'{DISPLAY}: {path} ends inside an example (no query '
                     'line after its last context lines)')
  if not items:
    raise ValueError(f'{DISPLAY}: {path} holds no examples')
  return items


def load(task_dir: str) -> list[mc.Item]:
  """The test examples of the four groups, CN, NE, P, V in that order."""
  items = []
  for group in GROUPS:
    items.extend(parse_file(find_file(task_dir, group), group))
  return items
