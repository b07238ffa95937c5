"""Zero-shot scoring of a Hugging Face directory against transformers.

A tiny random Llama directory (moe_jax.convert.tiny) is scored by
`python -m eval.zero_shot --hf=DIR` on a 4-item PIQA-format folder. The
reference is transformers' own PyTorch model on the same token sequences
(bos + context ids + continuation ids, each piece encoded on its own): its
per-option log-likelihoods, and the accuracy under LibMoE's norm rule
computed from them here.
"""

import json

import numpy as np
import pytest

from eval import text_scorer
from eval import zero_shot
from moe_jax.convert import tiny

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

ITEMS = [
    ('How do you open a jar?', 'twist the lid', 'eat the lid', 0),
    ('How do you boil water?', 'freeze it', 'heat it in a pot', 1),
    ('How do you dry a shirt?', 'hang it in the sun', 'soak it', 0),
    ('How do you cut bread?', 'with a spoon', 'with a knife', 1),
]


@pytest.fixture(scope='module')
def hf_dir(tmp_path_factory):
  out = tmp_path_factory.mktemp('hf') / 'tiny_llama'
  tiny.write_tiny_hf(str(out), family='llama')
  return out


@pytest.fixture(scope='module')
def task_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp('tasks')
  (root / 'piqa').mkdir()
  with open(root / 'piqa' / 'valid.jsonl', 'w') as f:
    for goal, sol1, sol2, _ in ITEMS:
      f.write(json.dumps({'goal': goal, 'sol1': sol1, 'sol2': sol2}) + '\n')
  (root / 'piqa' / 'valid-labels.lst').write_text(
      ''.join(f'{label}\n' for *_, label in ITEMS))
  return root


def torch_loglikelihoods(hf_dir, pairs):
  """(sum of continuation log-probs, continuation tokens) per pair."""
  tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
  model = transformers.AutoModelForCausalLM.from_pretrained(
      hf_dir, dtype=torch.float32).eval()
  out = []
  for context, continuation in pairs:
    ctx = tokenizer(context, add_special_tokens=False)['input_ids']
    cont = tokenizer(continuation, add_special_tokens=False)['input_ids']
    ids = torch.tensor([[tokenizer.bos_token_id] + ctx + cont])
    with torch.no_grad():
      logits = model(ids).logits[0].double()
    log_probs = torch.log_softmax(logits, -1)
    targets = ids[0, 1:]
    per_token = log_probs[:-1].gather(1, targets[:, None])[:, 0]
    out.append((float(per_token[-len(cont):].sum()), len(cont)))
  return out


def test_hf_directory_scores_like_transformers(hf_dir, task_dir, tmp_path):
  pairs = [(f'Question: {goal}\nAnswer:', f' {sol}')
           for goal, sol1, sol2, _ in ITEMS for sol in (sol1, sol2)]
  reference = torch_loglikelihoods(hf_dir, pairs)
  scorer = text_scorer.TextScorer.from_hf(str(hf_dir), batch_size=8,
                                           max_len=64, progress=False)
  for score, (logprob, n) in zip(scorer.loglikelihood(pairs), reference):
    assert score.num_tokens == n
    np.testing.assert_allclose(score.logprob, logprob, rtol=1e-4, atol=1e-4)
  # LibMoE's norm rule by hand: mean log-prob per option token, the right
  # option strictly best.
  norm = [logprob / n for logprob, n in reference]
  correct = [norm[2 * i + label] > norm[2 * i + 1 - label]
             for i, (*_, label) in enumerate(ITEMS)]
  rc = zero_shot.main(['--hf', str(hf_dir), '--data_dir', str(task_dir),
                       '--tasks', 'piqa', '--max_len', '64',
                       '--batch_size', '8', '--out', str(tmp_path)])
  assert rc == 0
  result = json.loads((tmp_path / 'step=0.json').read_text())
  assert result['tasks']['piqa']['count'] == len(ITEMS)
  assert result['tasks']['piqa']['score'] == pytest.approx(np.mean(correct))
  assert result['ppl'] is None and result['router'] == 'hf'


def test_missing_task_folder(hf_dir, tmp_path, capsys):
  rc = zero_shot.main(['--hf', str(hf_dir), '--data_dir', str(tmp_path),
                       '--tasks', 'siqa'])
  assert rc == 2
  assert str(tmp_path / 'siqa') in capsys.readouterr().err
