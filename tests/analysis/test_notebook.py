"""notebooks/routing_analysis.ipynb runs top to bottom on traces made here."""

import os
import pathlib

import nbclient
import nbformat
import numpy as np

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


def test_notebook_executes_on_traces_made_in_the_test(tmp_path):
  rng = np.random.default_rng(0)
  for step in (10, 20):
    trace_lib.write_trace(str(tmp_path / 'traces'), step, _batches(rng))
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  env_before = dict(os.environ)
  os.environ['MOE_JAX_WORKDIR'] = str(tmp_path)
  os.environ['PYTHONPATH'] = os.pathsep.join(
      [str(REPO), os.environ.get('PYTHONPATH', '')])
  try:
    nbclient.NotebookClient(notebook, timeout=300, kernel_name='python3',
                            resources={'metadata': {'path': str(tmp_path)}}
                            ).execute()
  finally:
    os.environ.clear()
    os.environ.update(env_before)
  outputs = [o for cell in notebook.cells if cell.cell_type == 'code'
             for o in cell.outputs]
  text = ''.join(o.get('text', '') for o in outputs)
  assert 'steps [10, 20]; layers [0, 1]' in text
  assert "router width E' = 6" in text
  figures = [o for o in outputs if 'image/png' in o.get('data', {})]
  # Frequency, domain entropy, margin, change rate, co-activation.
  assert len(figures) == 5
  assert 'no droptop.json' in text
