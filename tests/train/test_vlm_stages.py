"""LibMoE's three VLM stages end to end on the tiny configs (no files needed).

PT (projector only) -> PFT (everything dense) -> SFT (tower and projector
upcycled to MoE), each through `python -m moe_jax.main` from the previous
stage's workdir, on tiny random HF Phi-3 + SigLIP models and the built-in
coloured-shapes set that the first stage writes. The loss falls in every
stage, frozen parameters stay put in PT, the upcycled SFT model starts
where PFT ended, and after SFT the model answers the shapes task's
multiple-choice questions (colour: 4 options, shape: 3) above chance.
"""

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from eval import vlm_scorer
from moe_jax import restore
from moe_jax import run_log
from moe_jax import trace as trace_lib
from moe_jax.analysis import report as report_lib
from moe_jax.convert import hf_import
from moe_jax.convert import vision_families

REPO = pathlib.Path(__file__).resolve().parents[2]


def main(config: str, workdir, *overrides: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env.pop('XLA_FLAGS', None)
  proc = subprocess.run(
      [sys.executable, '-m', 'moe_jax.main', f'--config={config}',
       f'--workdir={workdir}', *overrides], cwd=REPO, env=env,
      capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return proc


def losses(workdir) -> np.ndarray:
  frame = run_log.read_metrics(str(workdir))
  return frame['loss'].to_numpy()


def params_of(workdir):
  saved = run_log.load_saved_config(str(workdir))
  return restore.restore_run(saved, str(workdir)).params


@pytest.fixture(scope='module')
def stages(tmp_path_factory):
  root = tmp_path_factory.mktemp('vlm')
  procs = {}
  previous = []
  for stage in ('pt', 'pft', 'sft'):
    procs[stage] = main(f'configs/vlm/smoe_{stage}.py:tiny', root / stage,
                        *previous)
    previous = [f'--config.init.previous_stage={root / stage}']
  return root, procs


def test_loss_falls_in_every_stage(stages):
  root, _ = stages
  for stage in ('pt', 'pft', 'sft'):
    loss = losses(root / stage)
    # Mean of the first vs the last five logged steps.
    assert loss[-5:].mean() < loss[:5].mean() - 0.05, (stage, loss)


def test_pt_trains_the_projector_only(stages):
  root, _ = stages
  pt = params_of(root / 'pt')
  pft = params_of(root / 'pft')
  # The PT checkpoint's tower and LLM are the tiny HF models' weights,
  # untouched; PFT changed them.
  _, tower = vision_families.import_tower(str(root / 'pt' / 'hf' / 'siglip'))
  _, llm, _ = hf_import.import_hf(str(root / 'pt' / 'hf' / 'phi3'),
                                  progress=False)
  np.testing.assert_array_equal(
      np.asarray(pt['vision']['layer_0']['ffn']['ffn']['w_in']),
      np.asarray(tower['layer_0']['ffn']['ffn']['w_in']))
  np.testing.assert_array_equal(np.asarray(pt['llm']['embedding']),
                                np.asarray(llm['embedding']))
  assert not np.array_equal(np.asarray(pft['llm']['embedding']),
                            np.asarray(llm['embedding']))


def test_sft_upcycles_and_starts_where_pft_ended(stages):
  root, procs = stages
  assert 'tower and projector MLPs as 4 smoe experts' in procs['sft'].stderr
  sft = params_of(root / 'sft')
  experts = sft['vision']['layer_0']['moe']['experts']['w_in']
  assert experts.shape[0] == 4
  # Step 0 of SFT computes the PFT model's function (exact copies, weights
  # summing to 1): its first loss is within noise of PFT's last ones.
  assert abs(losses(root / 'sft')[0] - losses(root / 'pft')[-5:].mean()) < 0.3


def test_sft_model_answers_the_shapes_task_above_chance(stages):
  root, _ = stages
  scorer = vlm_scorer.VLMScorer.from_workdir(str(root / 'sft'))
  shapes = root / 'sft' / 'data' / 'shapes'
  items = vlm_scorer.read_items(shapes / 'eval.jsonl')
  accuracy = scorer.score_choices(items, image_dir=shapes)
  chance = np.mean([1.0 / len(item['options']) for item in items])
  # 128 items: chance is about 0.29 with a standard error of about 0.04.
  assert accuracy > chance + 0.15, (accuracy, chance)


def test_a_tiny_sft_stage_runs_alone(tmp_path):
  # No previous stage: the tiny HF models, a random projector, upcycled.
  proc = main('configs/vlm/sigmoid_sft.py:tiny', tmp_path / 'sft',
              '--config.train.steps=3', '--config.train.warmup_steps=1',
              '--config.train.log_every=1')
  assert 'random projector' in proc.stderr
  assert len(losses(tmp_path / 'sft')) == 3


def test_trace_of_the_sft_tower_and_its_report(stages):
  root, _ = stages
  main('configs/vlm/smoe_sft.py:tiny', root / 'sft', '--mode=trace')
  frame = trace_lib.read_trace(str(root / 'sft' / 'traces'))
  # Tower layers (3) and the projector, 16 image tokens per image, every
  # image labelled by its shape (circle / square / triangle).
  assert sorted(frame['layer'].unique()) == [0, 1, 2, 3]
  assert sorted(frame['domain'].unique()) == [0, 1, 2]
  report = report_lib.build_report(str(root / 'sft'))
  summary = (pathlib.Path(report['path']) / 'summary.md').read_text()
  # LibMoE's VLM statistics per site (§8.4): the tower and the projector.
  assert 'Router statistics by site' in summary
  assert 'projector' in summary
