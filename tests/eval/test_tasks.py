"""The task readers and registry (eval/tasks/): golden tests per task.

Each golden test writes a tiny data set in the task's on-disk format, sets
the stub scorer's log-likelihoods by hand and checks the accuracy worked
out in the comments. The stub raises on any (context, continuation) pair it
was not given, so these tests also pin every prompt string.
"""

import collections
import json
import os
import re

import pytest

from eval import multiple_choice as mc
from eval import tasks
from tests.eval.conftest import StubScorer


def write_jsonl(path, rows):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w', encoding='utf-8') as f:
    for row in rows:
      f.write(json.dumps(row) + '\n')


def write_lines(path, lines):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w', encoding='utf-8') as f:
    f.write(''.join(line + '\n' for line in lines))


def run(name, tmp_path, table, **kwargs):
  """run_task over tmp_path with a stub; checks it made one call."""
  scorer = StubScorer(table)
  entry = tasks.run_task(name, scorer, str(tmp_path), **kwargs)
  assert len(scorer.calls) == 1 and scorer.calls[0][1] == name
  return entry, scorer.calls[0][0]


# --- registry -----------------------------------------------------------


def test_registry_order_names_rules_folders():
  assert list(tasks.TASKS) == ['lambada', 'blimp', 'cbt', 'hellaswag', 'piqa',
                               'arc', 'race', 'siqa', 'commonsenseqa']
  assert [s.display for s in tasks.TASKS.values()] == [
      'LAMBADA', 'BLiMP', 'CBT', 'HellaSwag', 'PIQA', 'ARC', 'RACE', 'SIQA',
      'CSQA']
  assert {n: s.rule for n, s in tasks.TASKS.items()} == {
      'lambada': 'greedy_last_word', 'blimp': 'sum', 'cbt': 'sum',
      'hellaswag': 'norm', 'piqa': 'norm', 'arc': 'norm', 'race': 'norm',
      'siqa': 'norm', 'commonsenseqa': 'norm'}
  assert all(s.subdir == s.name for s in tasks.TASKS.values())


def test_parse_task_list():
  assert tasks.parse_task_list('all') == list(tasks.TASKS)
  assert tasks.parse_task_list(' ALL ') == list(tasks.TASKS)
  # Canonical order, no repeats, display names and any case accepted.
  assert tasks.parse_task_list('siqa, piqa,CSQA,piqa,') == [
      'piqa', 'siqa', 'commonsenseqa']
  assert tasks.parse_task_list('LAMBADA') == ['lambada']


def test_parse_task_list_unknown_names_the_field_and_known_tasks():
  with pytest.raises(ValueError) as e:
    tasks.parse_task_list('piqa,winogrande')
  message = str(e.value)
  assert 'config.eval.tasks' in message and "'winogrande'" in message
  for name in tasks.TASKS:
    assert name in message
  with pytest.raises(ValueError, match='config.eval.tasks is empty'):
    tasks.parse_task_list(' , ')


def test_run_task_unknown_name():
  with pytest.raises(ValueError, match='unknown task.*lambada, blimp'):
    tasks.run_task('mmlu', StubScorer({}), '/nonexistent')


def test_subsample_per_group_evenly_spaced_in_order():
  items = ([mc.Item('a', f'a{i}', ('x', 'y'), 0) for i in range(10)] +
           [mc.Item('b', f'b{i}', ('x', 'y'), 0) for i in range(2)])
  # Interleave the groups to check that the order is kept.
  items = [items[i] for i in (0, 10, 1, 2, 3, 11, 4, 5, 6, 7, 8, 9)]
  kept = tasks.subsample(items, 3)
  # Group a (10 items): positions floor(j * 10 / 3) = 0, 3, 6.
  # Group b (2 items): both (2 <= 3).
  assert [i.context for i in kept] == ['a0', 'b0', 'a3', 'b1', 'a6']
  assert tasks.subsample(items, None) == items
  assert tasks.subsample(items, 0) == items
  assert tasks.subsample(items, 100) == items
  assert tasks.subsample(items, 3) == kept   # deterministic
  with pytest.raises(ValueError, match='max_examples'):
    tasks.subsample(items, -1)


# --- golden tests, one per task ------------------------------------------


def test_blimp_golden(tmp_path):
  d = tmp_path / 'blimp'

  def pair(good, bad):
    return {'sentence_good': good, 'sentence_bad': bad, 'field': 'syntax',
            'UID': 'x', 'pairID': '0'}
  # Written b first: the files are read in sorted order (p_a, p_b).
  write_jsonl(d / 'p_b.jsonl', [pair('Cats sleep.', 'Cats sleeps.')])
  write_jsonl(d / 'p_a.jsonl', [pair('I ran.', 'I runned.'),
                                pair('She is.', 'She are.')])
  table = {
      # 'sum' with an empty context: context_logprob 0, score = logprob.
      ('', 'I ran.'): (-10.0, 3, 0.0, ''),      # -10 > -12: right
      ('', 'I runned.'): (-12.0, 4, 0.0, ''),
      ('', 'She is.'): (-8.0, 3, 0.0, ''),      # -8 == -8: tie, wrong
      ('', 'She are.'): (-8.0, 3, 0.0, ''),
      ('', 'Cats sleep.'): (-9.0, 4, 0.0, ''),  # -9 > -9.5: right
      ('', 'Cats sleeps.'): (-9.5, 2, 0.0, ''),
  }
  entry, pairs = run('blimp', tmp_path, table)
  # p_a: 1/2 = 0.5, p_b: 1/1 = 1.0 -> score (0.5 + 1) / 2 = 0.75;
  # seq_average = 2/3.
  assert entry['score'] == 0.75
  assert entry['seq_average'] == pytest.approx(2 / 3)
  assert entry['count'] == 3 and entry['rule'] == 'sum'
  assert entry['groups'] == {'p_a': {'accuracy': 0.5, 'count': 2},
                             'p_b': {'accuracy': 1.0, 'count': 1}}
  assert pairs[0] == ('', 'I ran.') and pairs[-1] == ('', 'Cats sleeps.')


def cbt_example(tag, query, answer, candidates):
  """One CBTest example: 20 numbered context lines and the query line."""
  lines = [f'{i} {tag} sentence {i} .' for i in range(1, 21)]
  lines.append(f'21 {query}\t{answer}\t\t{"|".join(candidates)}')
  return lines + ['']


def cbt_context(tag, before):
  # Written out after LibMoE's detokenize: 'sentence 1 .' -> 'sentence 1.'.
  return ' '.join(f'{tag} sentence {i}.' for i in range(1, 21)) + ' ' + before


# Ten candidates per example (LibMoE skips any other count).
CN = ['hat', 'mat', 'rug', 'cap', 'box', 'bag', 'cup', 'pot', 'pan', 'jar']
NE = ['Anna', 'Tom', 'Bob', 'Sam', 'Joe', 'Kim', 'Lee', 'Max', 'Pat', 'Ann']
P = ['up', 'down', 'in', 'out', 'on', 'off', 'at', 'by', 'to', 'of']
V = ['ran', 'sang', 'ate', 'sat', 'hid', 'dug', 'fed', 'led', 'met', 'won']


@pytest.mark.parametrize('raw, expected', [
    # Each expected string worked out by hand from LibMoE's replacement
    # list (eval/cbt.py detokenize), in its order.
    # '``I' has no space after the backquotes, so it stays.
    ("`` Hello , '' said Tom , ``I don't know . ''",
     '"Hello," said Tom, ``I don\'t know."'),
    ("He did n't see it ; she was n't there !",
     "He didn't see it; she wasn't there!"),
    ("The dog 's bone : a stick ?", "The dog's bone: a stick?"),
    ("`` Where is XXXXX ? '' asked the girl .",
     '"Where is XXXXX?" asked the girl.'),
    ('no change here', 'no change here'),
])
def test_cbt_detokenize(raw, expected):
  from eval.tasks import cbt
  assert cbt.detokenize(raw) == expected


def test_cbt_golden(tmp_path):
  d = tmp_path / 'cbt'
  # CN and NE directly in the task folder; P and V as CBTest.tgz unpacks.
  write_lines(d / 'cbtest_CN_test_2500ex.txt', cbt_example(
      'cn', 'The cat sat on the XXXXX by the door .', 'mat', CN))
  write_lines(d / 'cbtest_NE_test_2500ex.txt', cbt_example(
      'ne', '`` Hello , XXXXX , \'\' said Tom .', 'Anna', NE) +
      # A second NE example with 9 candidates: skipped, as LibMoE does.
      cbt_example('ne', 'XXXXX went home .', 'Tom', NE[:9]))
  write_lines(d / 'CBTest' / 'data' / 'cbtest_P_test_2500ex.txt', cbt_example(
      'p', 'He looked XXXXX', 'up', P))
  write_lines(d / 'CBTest' / 'data' / 'cbtest_V_test_2500ex.txt', cbt_example(
      'v', 'She XXXXX home .', 'ran', V))
  # Detokenised by hand: '`` Hello , XXXXX , '' said Tom .' -> (" '" -> "'")
  # '`` Hello , XXXXX ,'' said Tom .' -> ('`` ' and "''" -> '"')
  # '"Hello , XXXXX ," said Tom .' -> (' ,', ' .') '"Hello, XXXXX," said
  # Tom.'; so the NE options end '," said Tom.'. ' .' -> '.' everywhere.
  cn = cbt_context('cn', 'The cat sat on the')
  ne = cbt_context('ne', '"Hello,')
  p = cbt_context('p', 'He looked')
  v = cbt_context('v', 'She')
  # The same context for every option, so 'sum' compares the logprobs.
  # Options not listed below score -9 (never the best).
  table = {}
  for context, cands, after in [(cn, CN, ' by the door.'),
                                (ne, NE, '," said Tom.'),
                                (p, P, ''), (v, V, ' home.')]:
    for c in cands:
      table[(context, c + after)] = (-9.0, 3, -40.0, '')
  table.update({
      # CN: mat (label 1) -3 beats -5 and the -9s: right.
      (cn, 'hat by the door.'): (-5.0, 5, -40.0, ''),
      (cn, 'mat by the door.'): (-3.0, 5, -40.0, ''),
      # NE: Anna (label 0) ties Bob at -30 - 2 = -32: wrong.
      (ne, 'Anna," said Tom.'): (-2.0, 6, -30.0, ''),
      (ne, 'Bob," said Tom.'): (-2.0, 6, -30.0, ''),
      # P: the blank ends the query, options are the bare candidates.
      # up (label 0) -1 beats -2: right.
      (p, 'up'): (-1.0, 1, -20.0, ''),
      (p, 'down'): (-2.0, 1, -20.0, ''),
      # V: ran (label 0) -6 loses to sang -5: wrong.
      (v, 'ran home.'): (-6.0, 3, -25.0, ''),
      (v, 'sang home.'): (-5.0, 3, -25.0, ''),
  })
  entry, pairs = run('cbt', tmp_path, table)
  # One item per group (the 9-candidate NE example skipped): CN 1, NE 0,
  # P 1, V 0 -> score (1 + 0 + 1 + 0) / 4 = 0.5; seq 2/4.
  assert entry['score'] == 0.5 and entry['seq_average'] == 0.5
  assert entry['rule'] == 'sum' and entry['count'] == 4
  assert list(entry['groups']) == ['CN', 'NE', 'P', 'V']
  assert len(pairs) == 40
  assert pairs[10] == (
      'ne sentence 1. ne sentence 2. ne sentence 3. ne sentence 4. '
      'ne sentence 5. ne sentence 6. ne sentence 7. ne sentence 8. '
      'ne sentence 9. ne sentence 10. ne sentence 11. ne sentence 12. '
      'ne sentence 13. ne sentence 14. ne sentence 15. ne sentence 16. '
      'ne sentence 17. ne sentence 18. ne sentence 19. ne sentence 20. '
      '"Hello,', 'Anna," said Tom.')


def test_cbt_detokenises_context_lines(tmp_path):
  """A CBTest snippet with PTB spacing in the context lines."""
  d = tmp_path / 'cbt'
  lines = ["1 `` Come here , '' said Mother .",
           "2 The boy did n't move ; he was n't sure ."]
  lines += [f'{i} Line {i} !' for i in range(3, 21)]
  lines += ["21 `` Where is XXXXX ? '' asked the girl .\tTom\t\t"
            'Tom|Mary|Bob|Ann|Sam|Joe|Kim|Lee|Max|Pat', '']
  for group in ('CN', 'NE', 'P', 'V'):
    write_lines(d / f'cbtest_{group}_test_2500ex.txt', lines)
  items = tasks.TASKS['cbt'].load(str(d))
  assert len(items) == 4
  item = items[0]
  # By hand: `` -> ", '' -> ", ' ,' -> ',', ' .' -> '.', " n't" -> "n't",
  # ' ;' -> ';', ' !' -> '!', ' ?' -> '?'.
  assert item.context == (
      '"Come here," said Mother. The boy didn\'t move; he wasn\'t sure. ' +
      ' '.join(f'Line {i}!' for i in range(3, 21)) + ' "Where is')
  assert item.options[:2] == ('Tom?" asked the girl.',
                              'Mary?" asked the girl.')
  assert item.label == 0 and len(item.options) == 10


def test_hellaswag_golden(tmp_path):
  rows = [
      {'activity_label': 'Removing ice from car', 'ctx_a': 'A man scrapes '
       'the window.', 'ctx_b': 'then', 'label': 1, 'endings': [
           'he drives off.', 'the [substeps] ice falls.', 'x', 'y']},
      {'activity_label': 'Health', 'ctx_a': '[header] How to stay calm '
       '[title] Breathe deeply.', 'ctx_b': '', 'label': 0,
       'endings': ['[step] Count to ten.  Slowly.', 'Run.', 'Yell.',
                   'Sleep.']},
      {'activity_label': 'Cooking', 'ctx_a': 'She stirs.', 'ctx_b': 'THE pot',
       'label': 3, 'endings': ['a', 'b', 'c', 'd']},
  ]
  write_jsonl(tmp_path / 'hellaswag' / 'hellaswag_val.jsonl', rows)
  # preprocess(activity_label + ': ' + ctx_a + ' ' + ctx_b.capitalize()).
  q1 = 'Removing ice from car: A man scrapes the window. Then'
  # ' [title]' -> '. ', '[header]' dropped, double spaces collapsed; the
  # trailing ' ' of the empty ctx_b is stripped.
  q2 = 'Health: How to stay calm. Breathe deeply.'
  q3 = 'Cooking: She stirs. The pot'    # capitalize() lowers the rest
  table = {
      # Item 1, label 1: norm -6/3 = -2 beats -4/1 = -4 and -10/2 = -5.
      # The raw sum would pick option 0 (-4 > -6): norm flips it, right.
      (q1, ' he drives off.'): (-4.0, 1, -9.0, ''),
      (q1, ' the ice falls.'): (-6.0, 3, -9.0, ''),
      (q1, ' x'): (-10.0, 2, -9.0, ''),
      (q1, ' y'): (-10.0, 2, -9.0, ''),
      # Item 2, label 0: -3/1 = -3 ties -6/2 = -3: wrong. lm-eval strips
      # before dropping '[step]', so the ending keeps a leading space.
      (q2, '  Count to ten. Slowly.'): (-3.0, 1, -9.0, ''),
      (q2, ' Run.'): (-6.0, 2, -9.0, ''),
      (q2, ' Yell.'): (-8.0, 2, -9.0, ''),
      (q2, ' Sleep.'): (-9.0, 2, -9.0, ''),
      # Item 3, label 3: -10/2 = -5 loses to -4/1: wrong.
      (q3, ' a'): (-4.0, 1, -9.0, ''),
      (q3, ' b'): (-12.0, 2, -9.0, ''),
      (q3, ' c'): (-12.0, 2, -9.0, ''),
      (q3, ' d'): (-10.0, 2, -9.0, ''),
  }
  entry, _ = run('hellaswag', tmp_path, table)
  # 1 of 3 right.
  assert entry['score'] == pytest.approx(1 / 3)
  assert entry['groups'] == {'hellaswag': {'accuracy': pytest.approx(1 / 3),
                                           'count': 3}}
  assert entry['rule'] == 'norm'


def test_hellaswag_preprocess_is_lm_evals():
  from eval.tasks import hellaswag
  assert hellaswag.preprocess(' A [title] B [step] C  D ') == 'A. B C D'


def write_piqa(d, rows, labels):
  write_jsonl(d / 'valid.jsonl', rows)
  write_lines(d / 'valid-labels.lst', [str(x) for x in labels])


def test_piqa_golden(tmp_path):
  write_piqa(tmp_path / 'piqa', [
      {'goal': 'Open a jar', 'sol1': 'twist the lid', 'sol2': 'hit it'},
      {'goal': 'Dry a shirt', 'sol1': 'hang it', 'sol2': 'wet it'},
      {'goal': 'Cool tea', 'sol1': 'heat it', 'sol2': 'add ice'},
  ], [0, 0, 1])
  q = 'Question: {}\nAnswer:'.format
  table = {
      # Label 0: -6/3 = -2 beats -4/1 = -4 (the raw sum prefers sol2): right.
      (q('Open a jar'), ' twist the lid'): (-6.0, 3, -5.0, ''),
      (q('Open a jar'), ' hit it'): (-4.0, 1, -5.0, ''),
      # Label 0: -4/2 = -2 ties -2/1 = -2: wrong.
      (q('Dry a shirt'), ' hang it'): (-4.0, 2, -5.0, ''),
      (q('Dry a shirt'), ' wet it'): (-2.0, 1, -5.0, ''),
      # Label 1: -1/2 = -0.5 beats -3/2 = -1.5: right.
      (q('Cool tea'), ' heat it'): (-3.0, 2, -5.0, ''),
      (q('Cool tea'), ' add ice'): (-1.0, 2, -5.0, ''),
  }
  entry, _ = run('piqa', tmp_path, table)
  # 2 of 3 right.
  assert entry == {'score': pytest.approx(2 / 3),
                   'seq_average': pytest.approx(2 / 3), 'count': 3,
                   'rule': 'norm',
                   'groups': {'piqa': {'accuracy': pytest.approx(2 / 3),
                                       'count': 3}}}
  # max_examples=2 keeps items floor(0 * 3/2) = 0 and floor(1 * 3/2) = 1:
  # the first right, the second a tie -> 1/2.
  entry, pairs = run('piqa', tmp_path, table, max_examples=2)
  assert entry['count'] == 2 and entry['score'] == 0.5
  assert len(pairs) == 4


def test_arc_converted_golden(tmp_path):
  d = tmp_path / 'arc'
  write_jsonl(d / 'arc_easy_test.jsonl', [
      {'query': 'Question: Hot?', 'choices': ['sun', 'ice', 'snow', 'hail'],
       'gold': 0},
      # A padded 3-choice question (repeated 'faster'): dropped. The stub
      # has no values for it, so scoring it would fail the test.
      {'query': 'Question: Sand?', 'choices': ['faster', 'slower', 'faster',
                                               'same'], 'gold': 1},
      {'query': 'Question: Wet?', 'choices': ['rock', 'rain', 'sand', 'dust'],
       'gold': 1},
  ])
  write_jsonl(d / 'arc_challenge_test.jsonl', [
      {'query': 'Question: Cell?', 'choices': ['atom', 'cell', 'organ',
                                               'tissue'], 'gold': 1},
  ])
  table = {}
  for q, choices, scores in [
      # Easy 1, label 0: 'sun' -2/2 = -1 beats 'ice' -3/1 = -3: right.
      ('Hot?', ['sun', 'ice', 'snow', 'hail'],
       [(-2.0, 2), (-3.0, 1), (-9.0, 1), (-9.0, 1)]),
      # Easy 2, label 1: 'rain' -2/1 = -2 ties 'dust' -4/2 = -2: wrong.
      ('Wet?', ['rock', 'rain', 'sand', 'dust'],
       [(-9.0, 1), (-2.0, 1), (-9.0, 1), (-4.0, 2)]),
      # Challenge, label 1: 'cell' -6/3 = -2 beats 'atom' -5/1 = -5 though
      # its raw sum is lower (-6 < -5): right by norm.
      ('Cell?', ['atom', 'cell', 'organ', 'tissue'],
       [(-5.0, 1), (-6.0, 3), (-9.0, 1), (-9.0, 1)]),
  ]:
    for choice, (lp, n) in zip(choices, scores):
      table[(f'Question: {q}\nAnswer:', ' ' + choice)] = (lp, n, -7.0, '')
  entry, pairs = run('arc', tmp_path, table)
  # easy: 1/2 = 0.5, challenge: 1/1 -> score (0.5 + 1) / 2 = 0.75;
  # seq_average 2/3.
  assert entry['score'] == 0.75
  assert entry['seq_average'] == pytest.approx(2 / 3)
  assert entry['groups'] == {'easy': {'accuracy': 0.5, 'count': 2},
                             'challenge': {'accuracy': 1.0, 'count': 1}}
  assert len(pairs) == 12


def test_arc_canonical_files_are_preferred(tmp_path):
  d = tmp_path / 'arc'

  def canonical(stem, labels, texts, key):
    return {'id': 'x', 'answerKey': key, 'question': {
        'stem': stem, 'choices': [{'label': l, 'text': t}
                                  for l, t in zip(labels, texts)]}}
  write_jsonl(d / 'ARC-Easy-Test.jsonl', [
      canonical('Hot?', 'ABCD', ['sun', 'ice', 'snow', 'hail'], 'A'),
      # 3 choices: skipped as LibMoE does (no stub values for it).
      canonical('Sand?', 'ABC', ['faster', 'slower', 'same'], 'B'),
      # Numeric labels: answerKey '2' is index 1.
      canonical('Wet?', '1234', ['rock', 'rain', 'sand', 'dust'], '2'),
  ])
  # A converted easy file too: ignored because the canonical one exists.
  write_jsonl(d / 'arc_easy_test.jsonl', [
      {'query': 'Question: Other?', 'choices': ['a', 'b', 'c', 'd'],
       'gold': 0}])
  write_jsonl(d / 'ARC-V1-Feb2018-2' / 'ARC-Challenge' /
              'ARC-Challenge-Test.jsonl', [
                  canonical('Cell?', 'ABCD', ['atom', 'cell', 'organ',
                                              'tissue'], 'D')])
  table = {}
  for q, choices, logprobs in [
      ('Hot?', ['sun', 'ice', 'snow', 'hail'], [-1, -2, -3, -4]),    # right
      ('Wet?', ['rock', 'rain', 'sand', 'dust'], [-1, -2, -3, -4]),  # wrong
      ('Cell?', ['atom', 'cell', 'organ', 'tissue'], [-5, -5, -5, -5]),  # tie
  ]:
    for choice, lp in zip(choices, logprobs):
      table[(f'Question: {q}\nAnswer:', ' ' + choice)] = (float(lp), 1, 0.0, '')
  entry, _ = run('arc', tmp_path, table)
  # easy 1/2, challenge 0/1 -> score 0.25, seq 1/3.
  assert entry['score'] == 0.25
  assert entry['groups'] == {'easy': {'accuracy': 0.5, 'count': 2},
                             'challenge': {'accuracy': 0.0, 'count': 1}}


def test_race_golden(tmp_path):
  d = tmp_path / 'race' / 'test'

  def passage(path, article, questions, options, answers):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'w') as f:
      json.dump({'answers': answers, 'options': options,
                 'questions': questions, 'article': article,
                 'id': os.path.basename(path)}, f)
  # Sorted as strings: high/10.txt before high/2.txt.
  passage(d / 'high' / '2.txt', 'Art two.', ['Why?'],
          [['a', 'b', 'c', 'd']], ['D'])
  passage(d / 'high' / '10.txt', 'Art ten.', ['Who?', 'The _ is red.'],
          [['Ann', 'Bo', 'Cy', 'Di'], ['sky', 'rose', 'sea', 'grass']],
          ['B', 'B'])
  passage(d / 'middle' / '1.txt', 'Art one.', ['Where?'],
          [['here', 'there', 'home', 'away']], ['A'])
  prompt = 'Article: {}\nQuestion: {}\nAnswer:'.format
  table = {}
  for (art, q, options, logprobs, ntok) in [
      # high 10.txt q0, label 1 'Bo': -4/2 = -2 beats -3/1 = -3 (the raw
      # sum prefers 'Ann'): right.
      ('Art ten.', 'Who?', ['Ann', 'Bo', 'Cy', 'Di'], [-3, -4, -9, -9],
       [1, 2, 1, 1]),
      # high 10.txt q1, label 1 'rose': ties 'sky' at -2: wrong.
      ('Art ten.', 'The _ is red.', ['sky', 'rose', 'sea', 'grass'],
       [-2, -2, -9, -9], [1, 1, 1, 1]),
      # high 2.txt, label 3 'd': -1 beats -5: right.
      ('Art two.', 'Why?', ['a', 'b', 'c', 'd'], [-5, -5, -5, -1],
       [1, 1, 1, 1]),
      # middle 1.txt, label 0 'here': -8 loses to -1: wrong.
      ('Art one.', 'Where?', ['here', 'there', 'home', 'away'],
       [-8, -1, -9, -9], [1, 1, 1, 1]),
  ]:
    for option, lp, n in zip(options, logprobs, ntok):
      # ' ' + option, as LibMoE's race.py encodes it.
      table[(prompt(art, q), ' ' + option)] = (float(lp), n, -50.0, '')
  entry, pairs = run('race', tmp_path, table)
  # high: 2/3, middle: 0/1 -> score (2/3 + 0) / 2 = 1/3; seq 2/4 = 0.5.
  assert entry['score'] == pytest.approx(1 / 3)
  assert entry['seq_average'] == 0.5
  assert entry['groups'] == {
      'high': {'accuracy': pytest.approx(2 / 3), 'count': 3},
      'middle': {'accuracy': 0.0, 'count': 1}}
  assert [p[0] for p in pairs[::4]] == [
      prompt('Art ten.', 'Who?'), prompt('Art ten.', 'The _ is red.'),
      prompt('Art two.', 'Why?'), prompt('Art one.', 'Where?')]


def test_siqa_golden(tmp_path):
  d = tmp_path / 'siqa'
  write_jsonl(d / 'dev.jsonl', [
      {'context': 'Kai lost.', 'question': 'How does Kai feel?',
       'answerA': 'sad', 'answerB': 'happy', 'answerC': 'bored'},
      {'context': 'Ann won.', 'question': 'What next?',
       'answerA': 'cry', 'answerB': 'celebrate', 'answerC': 'sleep'},
      {'context': 'Bo ate.', 'question': 'Why?',
       'answerA': 'hungry', 'answerB': 'full', 'answerC': 'tired'},
  ])
  write_lines(d / 'dev-labels.lst', ['1', '2', '3'])
  prompt = 'Context: {}\nQuestion: {}\nAnswer:'.format
  p1, p2, p3 = (prompt('Kai lost.', 'How does Kai feel?'),
                prompt('Ann won.', 'What next?'), prompt('Bo ate.', 'Why?'))
  table = {
      # Label 1 -> index 0 'sad': -1 beats -2, -3: right.
      (p1, ' sad'): (-1.0, 1, -6.0, ''),
      (p1, ' happy'): (-2.0, 1, -6.0, ''),
      (p1, ' bored'): (-3.0, 1, -6.0, ''),
      # Label 2 -> 'celebrate': -6/3 = -2 ties 'sleep' -2/1: wrong.
      (p2, ' cry'): (-9.0, 1, -6.0, ''),
      (p2, ' celebrate'): (-6.0, 3, -6.0, ''),
      (p2, ' sleep'): (-2.0, 1, -6.0, ''),
      # Label 3 -> 'tired': -3/1 loses to 'hungry' -1: wrong.
      (p3, ' hungry'): (-1.0, 1, -6.0, ''),
      (p3, ' full'): (-5.0, 1, -6.0, ''),
      (p3, ' tired'): (-3.0, 1, -6.0, ''),
  }
  entry, _ = run('siqa', tmp_path, table)
  # 1 of 3.
  assert entry['score'] == pytest.approx(1 / 3)
  assert entry['groups'] == {'siqa': {'accuracy': pytest.approx(1 / 3),
                                      'count': 3}}


def test_commonsenseqa_golden(tmp_path):
  def row(stem, key, choices):
    return {'answerKey': key, 'id': stem, 'question': {
        'question_concept': 'x', 'stem': stem,
        'choices': [{'label': l, 'text': t} for l, t in choices]}}
  write_jsonl(tmp_path / 'commonsenseqa' / 'dev_rand_split.jsonl', [
      row('Where is ice?', 'B', [('A', 'oven'), ('B', 'freezer'),
                                 ('C', 'sun')]),
      # Out of label order in the file: options are put in label order.
      row('What barks?', 'A', [('C', 'cat'), ('A', 'dog'), ('B', 'fish')]),
      row('What is wet?', 'C', [('A', 'sand'), ('B', 'dust'), ('C', 'rain')]),
  ])
  q = 'Question: {}\nAnswer:'.format
  table = {
      # Label 'B' -> 'freezer': -6/3 = -2 beats 'oven' -3/1 = -3 (raw sum
      # would pick 'oven'): right.
      (q('Where is ice?'), ' oven'): (-3.0, 1, -4.0, ''),
      (q('Where is ice?'), ' freezer'): (-6.0, 3, -4.0, ''),
      (q('Where is ice?'), ' sun'): (-9.0, 1, -4.0, ''),
      # Label 'A' -> 'dog' (index 0 in label order): -1 beats: right.
      (q('What barks?'), ' dog'): (-1.0, 1, -4.0, ''),
      (q('What barks?'), ' fish'): (-5.0, 1, -4.0, ''),
      (q('What barks?'), ' cat'): (-2.0, 1, -4.0, ''),
      # Label 'C' -> 'rain': ties 'sand' at -2: wrong.
      (q('What is wet?'), ' sand'): (-2.0, 1, -4.0, ''),
      (q('What is wet?'), ' dust'): (-7.0, 1, -4.0, ''),
      (q('What is wet?'), ' rain'): (-4.0, 2, -4.0, ''),
  }
  entry, pairs = run('commonsenseqa', tmp_path, table)
  # 2 of 3.
  assert entry['score'] == pytest.approx(2 / 3)
  assert list(entry['groups']) == ['commonsenseqa']
  assert [c for _, c in pairs[3:6]] == [' dog', ' fish', ' cat']


# --- errors ---------------------------------------------------------------


@pytest.mark.parametrize('name', list(tasks.TASKS))
def test_missing_data_names_the_file_and_the_config_field(tmp_path, name):
  with pytest.raises(FileNotFoundError) as e:
    tasks.run_task(name, StubScorer({}), str(tmp_path))
  message = str(e.value)
  assert os.path.join(str(tmp_path), tasks.TASKS[name].subdir) in message
  assert 'config.eval.data_dir' in message


@pytest.mark.parametrize('name, file', [
    ('lambada', 'lambada_test.jsonl'), ('piqa', 'valid.jsonl'),
    ('siqa', 'dev.jsonl'), ('commonsenseqa', 'dev_rand_split.jsonl'),
    ('hellaswag', 'hellaswag_val.jsonl'), ('arc', 'arc_easy_test.jsonl'),
    ('cbt', 'cbtest_CN_test_2500ex.txt'), ('blimp', '*.jsonl'),
    ('race', os.path.join('test', 'high', '*.txt')),
])
def test_missing_file_is_named_exactly(tmp_path, name, file):
  with pytest.raises(FileNotFoundError) as e:
    tasks.TASKS[name].load(str(tmp_path / name))
  assert str(tmp_path / name / file) in str(e.value)


def test_missing_labels_file(tmp_path):
  write_jsonl(tmp_path / 'piqa' / 'valid.jsonl',
              [{'goal': 'g', 'sol1': 'a', 'sol2': 'b'}])
  with pytest.raises(FileNotFoundError) as e:
    tasks.run_task('piqa', StubScorer({}), str(tmp_path))
  assert str(tmp_path / 'piqa' / 'valid-labels.lst') in str(e.value)
  assert 'config.eval.data_dir' in str(e.value)


def test_malformed_json_line_names_file_and_line(tmp_path):
  path = tmp_path / 'piqa' / 'valid.jsonl'
  write_lines(path, ['{"goal": "g", "sol1": "a", "sol2": "b"}', '{"goal": '])
  write_lines(tmp_path / 'piqa' / 'valid-labels.lst', ['0', '1'])
  with pytest.raises(ValueError) as e:
    tasks.TASKS['piqa'].load(str(tmp_path / 'piqa'))
  assert f'{path} line 2' in str(e.value)


def test_missing_field_names_file_and_line(tmp_path):
  path = tmp_path / 'siqa' / 'dev.jsonl'
  write_jsonl(path, [{'context': 'c', 'question': 'q', 'answerA': 'a',
                      'answerB': 'b', 'answerC': 'c'},
                     {'context': 'c', 'question': 'q', 'answerA': 'a'}])
  write_lines(tmp_path / 'siqa' / 'dev-labels.lst', ['1', '2'])
  with pytest.raises(ValueError, match=r"line 2: missing field\(s\) "
                     r"\['answerB', 'answerC'\]") as e:
    tasks.TASKS['siqa'].load(str(tmp_path / 'siqa'))
  assert str(path) in str(e.value)


def test_bad_label_line_and_misaligned_labels(tmp_path):
  d = tmp_path / 'piqa'
  rows = [{'goal': 'g', 'sol1': 'a', 'sol2': 'b'}] * 2
  write_piqa(d, rows, ['0', '2'])
  with pytest.raises(ValueError, match=r"valid-labels.lst line 2: label '2'"):
    tasks.TASKS['piqa'].load(str(d))
  write_piqa(d, rows, ['0'])
  with pytest.raises(ValueError, match='2 examples but .* 1 labels'):
    tasks.TASKS['piqa'].load(str(d))


def test_malformed_cbt_lines(tmp_path):
  d = tmp_path / 'cbt'
  XS = ['x'] + [f'y{i}' for i in range(9)]
  for group in ('CN', 'NE', 'P', 'V'):
    write_lines(d / f'cbtest_{group}_test_2500ex.txt', cbt_example(
        group, 'A XXXXX b', 'x', XS))
  path = d / 'cbtest_NE_test_2500ex.txt'
  lines = cbt_example('ne', 'A XXXXX b', 'x', XS)
  write_lines(path, lines[:3] + ['no number here'] + lines[3:])
  with pytest.raises(ValueError, match=re.escape(
      f'{path} line 4: expected a line number')):
    tasks.TASKS['cbt'].load(str(d))
  write_lines(path, cbt_example('ne', 'A XXXXX b', 'z', XS))
  with pytest.raises(ValueError,
                     match=re.escape(f"{path} line 21: answer 'z'")):
    tasks.TASKS['cbt'].load(str(d))
  write_lines(path, cbt_example('ne', 'no blank', 'x', XS))
  with pytest.raises(ValueError, match='line 21: the query must hold XXXXX'):
    tasks.TASKS['cbt'].load(str(d))


def test_hellaswag_bad_label(tmp_path):
  path = tmp_path / 'hellaswag' / 'hellaswag_val.jsonl'
  write_jsonl(path, [{'activity_label': 'a', 'ctx_a': 'b', 'ctx_b': 'c',
                      'endings': ['x', 'y'], 'label': 5}])
  with pytest.raises(ValueError,
                     match=re.escape(f'{path} line 1: expected a list')):
    tasks.TASKS['hellaswag'].load(str(path.parent))


def test_race_malformed_file(tmp_path):
  path = tmp_path / 'race' / 'test' / 'high' / '1.txt'
  write_lines(path, ['{"article": "a",', '"questions": x}'])
  write_lines(tmp_path / 'race' / 'test' / 'middle' / '1.txt', ['{}'])
  with pytest.raises(ValueError, match=re.escape(f'{path} line 2')):
    tasks.TASKS['race'].load(str(tmp_path / 'race'))


# --- the real data (../shared/data/lm_eval) --------------------------------


def real_items(lm_eval_data, name):
  d = lm_eval_data / tasks.TASKS[name].subdir
  if not d.is_dir():
    pytest.skip(f'{name} data not found at {d}')
  return tasks.TASKS[name].load(str(d))


@pytest.mark.parametrize('name, groups, ways', [
    ('piqa', {'piqa': 1838}, 2),
    ('siqa', {'siqa': 1954}, 3),
    ('commonsenseqa', {'commonsenseqa': 1221}, 5),
    ('race', {'high': 3498, 'middle': 1436}, 4),
    # 2,376 / 1,172 lines, less 7 / 4 items with repeated (padded) choices.
    ('arc', {'easy': 2369, 'challenge': 1168}, 4),
])
def test_real_counts_and_labels(lm_eval_data, name, groups, ways):
  items = real_items(lm_eval_data, name)
  assert dict(collections.Counter(i.group for i in items)) == groups
  assert all(len(i.options) == ways for i in items)
  assert all(0 <= i.label < ways for i in items)
  # Every label is used (no reader stuck at one index).
  assert {i.label for i in items} == set(range(ways))
  if name == 'arc':
    assert all(len(set(i.options)) == 4 for i in items)


def test_real_blimp(lm_eval_data):
  items = real_items(lm_eval_data, 'blimp')
  counts = collections.Counter(i.group for i in items)
  assert len(counts) == 67 and set(counts.values()) == {1000}
  assert list(counts)[0] == 'adjunct_island'   # sorted file order
  assert all(i.context == '' and i.label == 0 and len(i.options) == 2
             for i in items)


def test_real_prompts(lm_eval_data):
  piqa = real_items(lm_eval_data, 'piqa')[0]
  assert piqa.context == ("Question: How do I ready a guinea pig cage for "
                          "it's new occupants?\nAnswer:")
  assert piqa.options[0].startswith(' Provide the guinea pig')
  siqa = real_items(lm_eval_data, 'siqa')[0]
  assert siqa.context == ("Context: Tracy didn't go home that evening and "
                          "resisted Riley's attacks.\nQuestion: What does "
                          'Tracy need to do before this?\nAnswer:')
  # LibMoE's siqa.py encodes ' ' + answer (the raw dev.jsonl line 1 has
  # answerA 'make a new plan', answerB 'Go home and see Riley', answerC
  # 'Find somewhere to go').
  assert siqa.options == (' make a new plan', ' Go home and see Riley',
                          ' Find somewhere to go')
  assert siqa.label == 2


def test_real_smoke_every_task(lm_eval_data):
  """run_task end to end on each task present, 3 items per group."""
  def fallback(context, continuation):
    return (-float(len(continuation)), max(1, len(continuation) // 4),
            -float(len(context)), '')
  ran = 0
  for name, spec in tasks.TASKS.items():
    if not (lm_eval_data / spec.subdir).is_dir():
      continue
    scorer = StubScorer({}, fallback=fallback)
    entry = tasks.run_task(name, scorer, str(lm_eval_data), max_examples=3)
    assert len(scorer.calls) == 1
    assert entry['count'] == 3 * len(entry['groups'])
    assert 0.0 <= entry['score'] <= 1.0 and entry['rule'] == spec.rule
    ran += 1
  assert ran >= 7
