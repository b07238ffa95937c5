"""Expert similarity (algorithms.md §9): ANI of weights, CKA of outputs.

  ANI (average normalised inner product): the mean pairwise cosine similarity
  between rows, diagonal excluded. For W_in and W_out the rows are the E·F
  hidden units of all experts of a layer; for the router the E expert rows.
  Output CKA: linear CKA (Kornblith et al., 2019) between two experts' outputs
  on the same tokens, the MoE layer's real inputs on the validation set.

  python -m moe_jax.main --config=... --workdir=DIR --mode=similarity
writes DIR/similarity.json (per-layer ANI and mean off-diagonal CKA) and
DIR/similarity_cka.npz (the [E, E] CKA matrix of every layer).

Dimension legend: T tokens, D model width, F expert width, E experts, L layers.
"""

from __future__ import annotations

import os
import tempfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from moe_jax import restore
from moe_jax.analysis import results
from moe_jax.analysis import tracing
from moe_jax.data import from_config
from moe_jax.models import decoder
from moe_jax.moe import experts as experts_lib
from moe_jax.moe import layer as layer_lib

RESULT_FILE = 'similarity.json'
CKA_FILE = 'similarity_cka.npz'


def cosine_matrix(rows: np.ndarray) -> np.ndarray:
  """[N, N] cosine similarity of rows [N, P] (a zero row scores 0)."""
  rows = np.asarray(rows, np.float64)
  norms = np.linalg.norm(rows, axis=1, keepdims=True)
  unit = rows / np.where(norms > 0, norms, 1.0)
  return unit @ unit.T


def ani(rows: np.ndarray) -> float:
  """Mean cosine similarity over pairs of distinct rows of [N, P], N >= 2."""
  n = len(rows)
  if n < 2:
    raise ValueError(f'ani: needs at least 2 rows, got {n}')
  sims = cosine_matrix(rows)
  return float(sims[~np.eye(n, dtype=bool)].mean())


def hidden_unit_rows(expert_params: dict) -> dict[str, np.ndarray]:
  """The E·F hidden units of a layer's experts as vectors (§9's E·m rows).

  A SwiGLU hidden unit j reads two input columns, its gate W_gate[:, j] and
  its up projection W_up[:, j] (W_in = [W_gate | W_up]): its W_in row is
  the two concatenated, so each unit is one row, as for the other
  activations, and gate and up vectors are never compared with each other.

  Args:
    expert_params: w_in [E, D, F'] (F' = 2F for SwiGLU, else F),
      w_out [E, F, D].

  Returns:
    {'w_in': [E·F, D] ([E·F, 2D] for SwiGLU), 'w_out': [E·F, D]}.
  """
  w_in = np.asarray(expert_params['w_in'], np.float64)
  w_out = np.asarray(expert_params['w_out'], np.float64)
  e, d, f_in = w_in.shape
  f = w_out.shape[1]
  columns = np.transpose(w_in, (0, 2, 1))                       # [E, F', D]
  if f_in == 2 * f:                                             # SwiGLU
    columns = np.concatenate([columns[:, :f], columns[:, f:]], axis=-1)
  return {'w_in': columns.reshape(e * f, -1),
          'w_out': w_out.reshape(-1, w_out.shape[-1])}


def router_expert_rows(router_params: dict, num_experts: int
                       ) -> np.ndarray | None:
  """The E routed experts' rows of a router: W[:, :E]ᵀ, or XMoE's embeddings.

  None for routers without a fixed per-expert row (HyperRouter generates its
  weights; a depth-2 MoE++ router has only a hidden layer before them).
  """
  if 'embed' in router_params:                    # XMoE: ε [E, X]
    return np.asarray(router_params['embed'])[:num_experts]
  if 'w_out' in router_params:                    # MoE++ depth 2
    return np.asarray(router_params['w_out']).T[:num_experts]
  if 'w' in router_params:
    return np.asarray(router_params['w']).T[:num_experts]
  return None


def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
  """Linear CKA of x [T, P] and y [T, Q]: ‖ỹᵀx̃‖² / (‖x̃ᵀx̃‖ ‖ỹᵀỹ‖), centred.

  1 for outputs equal up to rotation and isotropic scale; 0 when unrelated.
  """
  x = np.asarray(x, np.float64)
  y = np.asarray(y, np.float64)
  x = x - x.mean(axis=0)
  y = y - y.mean(axis=0)
  denom = np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)
  if denom == 0:
    return 0.0
  return float(np.linalg.norm(y.T @ x) ** 2 / denom)


def expert_outputs(expert_params: dict, x: np.ndarray, activation: str
                   ) -> np.ndarray:
  """[E, T, D]: every expert of a layer applied to the same tokens x [T, D]."""
  def one(params):
    return experts_lib.dense_ffn(params, jnp.asarray(x, jnp.float32),
                                 activation=activation)
  return np.asarray(jax.jit(jax.vmap(one))(
      {k: jnp.asarray(v, jnp.float32) for k, v in expert_params.items()}))


def output_cka(outputs: np.ndarray) -> np.ndarray:
  """[E, E] linear CKA between experts' outputs [E, T, D] (diagonal 1)."""
  e = len(outputs)
  cka = np.eye(e)
  for i in range(e):
    for j in range(i + 1, e):
      cka[i, j] = cka[j, i] = linear_cka(outputs[i], outputs[j])
  return cka


def moe_layer_inputs(model, variables: dict, tokens: np.ndarray
                     ) -> list[np.ndarray]:
  """Each MoE layer's input [B·S, D] (after its pre-norm) on `tokens` [B, S]."""
  captured = []

  def grab(next_fun, args, kwargs, context):
    if (isinstance(context.module, layer_lib.MoEBlock)
        and context.method_name == '__call__'):
      captured.append(args[0])
    return next_fun(*args, **kwargs)

  def run(variables, tokens):
    captured.clear()
    with nn.intercept_methods(grab):
      model.apply(variables, tokens, train=False)
    return [c.reshape(-1, c.shape[-1]) for c in captured]

  return [np.asarray(a) for a in jax.jit(run)(variables, tokens)]


def layer_similarity(params: dict, layer_inputs: list[np.ndarray], *,
                     num_experts: int, activation: str
                     ) -> tuple[pd.DataFrame, np.ndarray]:
  """Per-layer ANI of W_in, W_out and the router, and output CKA.

  Args:
    params: the model's params (layer_<i>/moe/{experts, router}).
    layer_inputs: [T, D] inputs of every MoE layer (moe_layer_inputs).
    num_experts: E.
    activation: the experts' activation.

  Returns:
    (a frame with one row per layer: ani_w_in, ani_w_out, ani_router (NaN
    when the router has no expert rows), cka_mean (off-diagonal mean);
    the [L, E, E] CKA matrices).
  """
  rows, matrices = [], []
  for i, x in enumerate(layer_inputs):
    moe = params[f'layer_{i}']['moe']
    experts = jax.device_get(moe['experts'])
    units = hidden_unit_rows(experts)
    router_rows = router_expert_rows(
        jax.device_get(moe['router']['router']), num_experts)
    cka = output_cka(expert_outputs(experts, x, activation))
    off = ~np.eye(num_experts, dtype=bool)
    rows.append({
        'layer': i, 'ani_w_in': ani(units['w_in']),
        'ani_w_out': ani(units['w_out']),
        'ani_router': (ani(router_rows) if router_rows is not None
                       else float('nan')),
        'cka_mean': float(cka[off].mean()) if num_experts > 1 else 1.0})
    matrices.append(cka)
  return pd.DataFrame(rows), np.stack(matrices)


def evaluate_similarity(config, workdir: str, *, step: int | None = None,
                        max_tokens: int = 2048):
  """Similarity of a workdir's checkpoint; inputs from its validation set.

  Returns:
    (per-layer frame with a 'step' column, [L, E, E] CKA matrices).
  """
  tracing.require_routing(config, 'compare experts of')
  # It reads each layer's experts from layer_{i} parameters.
  decoder.require_unrolled(config, 'expert similarity')
  run = restore.restore_run(config, workdir, step, what='compare experts of')
  model, variables, step = run.model, run.variables, run.step
  pipeline = from_config.build_data(config, os.path.abspath(workdir))
  per_layer, seen = None, 0
  for batch in pipeline.valid_iterator():
    inputs = moe_layer_inputs(model, variables, np.asarray(batch['inputs']))
    per_layer = inputs if per_layer is None else [
        np.concatenate([a, b]) for a, b in zip(per_layer, inputs)]
    seen += len(inputs[0])
    if seen >= max_tokens:
      break
  if per_layer is None:
    raise ValueError('evaluate_similarity: the validation set is empty')
  per_layer = [a[:max_tokens] for a in per_layer]
  frame, cka = layer_similarity(run.params, per_layer,
                                num_experts=config.moe.num_experts,
                                activation=config.moe.activation)
  frame['step'] = step
  return frame, cka


def write_similarity(workdir: str, frame: pd.DataFrame,
                     cka: np.ndarray) -> str:
  """DIR/similarity.json and DIR/similarity_cka.npz (each atomic)."""
  workdir = os.path.abspath(workdir)
  fd, tmp = tempfile.mkstemp(dir=workdir, suffix='.npz')
  with os.fdopen(fd, 'wb') as f:
    np.savez(f, cka=cka)
  os.replace(tmp, os.path.join(workdir, CKA_FILE))
  return results.write_table(workdir, RESULT_FILE, frame)


def read_similarity(workdir: str) -> pd.DataFrame | None:
  """DIR/similarity.json as a DataFrame, or None when not computed."""
  return results.read_table(workdir, RESULT_FILE)
