"""notebooks/routing_analysis.ipynb runs top to bottom on traces made here."""

import os
import pathlib

import nbclient
import nbformat
import numpy as np
import pytest

from moe_jax import trace as trace_lib

REPO = pathlib.Path(__file__).resolve().parents[2]
NOTEBOOK = REPO / 'notebooks' / 'routing_analysis.ipynb'


def _batches(rng, num_batches=2, width=6, k=2):
  """Random top-k routing of 2 windows x 16 tokens per batch, 2 layers."""
  for i in range(num_batches):
    tokens = rng.integers(0, 100, (2, 16))
    layers = []
    for _ in range(2):
      choice = np.argsort(rng.random((32, width)), axis=1)[:, :k]
      weight = np.sort(rng.dirichlet(np.ones(k), 32), axis=1)[:, ::-1]
      layers.append({'choice': choice, 'weight': weight.astype(np.float32),
                     'probs': rng.dirichlet(np.ones(width), 32)})
    yield tokens, np.array([i, i + 1]), layers


def _execute(notebook, workdir, cwd):
  """Runs `notebook` in a kernel started in `cwd`, MOE_JAX_WORKDIR=workdir."""
  env_before = dict(os.environ)
  os.environ['MOE_JAX_WORKDIR'] = str(workdir)
  os.environ['PYTHONPATH'] = os.pathsep.join(
      [str(REPO), os.environ.get('PYTHONPATH', '')])
  try:
    nbclient.NotebookClient(notebook, timeout=300, kernel_name='python3',
                            resources={'metadata': {'path': str(cwd)}}
                            ).execute()
  finally:
    os.environ.clear()
    os.environ.update(env_before)


# 'relative' is the README's `MOE_JAX_WORKDIR=runs/... jupyter lab`: the
# kernel runs in notebooks/ and the path is relative to the repository root
# (here with '..' up to tmp_path, to write nothing into the tree).
@pytest.mark.parametrize('workdir_kind', ['absolute', 'relative'])
def test_notebook_executes_on_traces_made_in_the_test(tmp_path, workdir_kind):
  rng = np.random.default_rng(0)
  for step in (10, 20):
    trace_lib.write_trace(str(tmp_path / 'traces'), step, _batches(rng))
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  if workdir_kind == 'relative':
    _execute(notebook, os.path.relpath(tmp_path, REPO), NOTEBOOK.parent)
  else:
    _execute(notebook, tmp_path, tmp_path)
  outputs = [o for cell in notebook.cells if cell.cell_type == 'code'
             for o in cell.outputs]
  text = ''.join(o.get('text', '') for o in outputs)
  assert 'steps [10, 20]; layers [0, 1]' in text
  assert "router width E' = 6" in text
  figures = [o for o in outputs if 'image/png' in o.get('data', {})]
  # Frequency, domain entropy, margin, change rate, co-activation.
  assert len(figures) == 5
  assert 'no droptop.json' in text


def test_notebook_names_the_missing_workdir(tmp_path):
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  with pytest.raises(nbclient.exceptions.CellExecutionError) as error:
    _execute(notebook, os.path.relpath(tmp_path / 'missing', REPO),
             NOTEBOOK.parent)
  # The path tried: the repository root joined with the relative workdir.
  tried = REPO / os.path.relpath(tmp_path / 'missing', REPO)
  assert f'MOE_JAX_WORKDIR: {tried} does not exist' in str(error.value)
