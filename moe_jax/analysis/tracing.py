"""Recording a model's routing into traces (the format: moe_jax/trace.py).

`routing_fn(model)` jits the per-layer routing of a batch; `trace_state`
runs it over a pipeline's validation set and writes one trace step;
`trace_checkpoint` does that for a workdir's checkpoint (`--mode=trace`);
for a VLM run (model_name 'llava') it traces the vision tower's and the
projector's routing of the validation images instead
(moe_jax/analysis/vlm_tracing.py).

Dimension legend: B batch, S sequence, K slots, E' router width.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np

from moe_jax import restore
from moe_jax import run_log
from moe_jax import state
from moe_jax import trace as trace_lib
from moe_jax.analysis import vlm_tracing
from moe_jax.data import from_config
from moe_jax.moe import router as router_lib


def require_routing(config, what: str) -> None:
  """The dense baseline routes nothing: a clear error, not an empty trace.

  DropTop and expert similarity score language models on text; a VLM's
  routing is analysed through its traces (--mode=trace).
  """
  if config.get('model_name') == 'llava':
    raise ValueError(f"model_name='llava': {what} a VLM is not supported "
                     '(LM runs only); trace its tower and projector with '
                     '--mode=trace and read the report')
  if config.model.dense_ffn:
    raise ValueError(f'model.dense_ffn: the dense baseline has no routing to '
                     f'{what}')


def router_width(workdir: str) -> int | None:
  """E' of an LM run's router (the width its traces' ids index), from the
  run's config.json; None without one (or for a VLM, whose traces carry
  their widths in _layers.json)."""
  if not os.path.isfile(os.path.join(workdir, run_log.CONFIG_FILE)):
    return None
  config = run_log.load_saved_config(workdir)
  moe = config.get('moe', {})
  if (config.get('model_name') == 'llava'
      or config.get('model', {}).get('dense_ffn')
      or not all(k in moe for k in ('router', 'num_experts', 'top_k',
                                    'd_model', 'router_options'))):
    return None
  return router_lib.output_width(moe.router, state.router_config(config))


def routing_fn(model, *, with_probs: bool = False):
  """jit: (params, router_state, tokens [B, S]) -> per-layer routing arrays.

  Returns a list over MoE layers of {'choice': [B*S, K] int32,
  'weight': [B*S, K] float32, 'top1': [B*S] int32, and with_probs
  'probs': [B*S, E']}.
  """
  def fn(params, router_state, tokens):
    variables = {'params': params}
    if router_state:
      variables['router_state'] = router_state
    _, auxes = model.apply(variables, tokens, train=False)
    out = []
    for aux in auxes:
      routing = aux['routing']
      layer = {'choice': routing['choice'], 'weight': routing['weight'],
               'top1': routing['top1']}
      if with_probs:
        layer['probs'] = routing['probs']
      out.append(layer)
    return out
  return jax.jit(fn)


def trace_checkpoint(config, workdir: str, *, step: int | None = None,
                     with_probs: bool = False) -> dict[str, Any]:
  """Traces a workdir's checkpoint over its validation set.

  Args:
    config: the run's config (as for training).
    workdir: the run directory; traces go to `<workdir>/traces/`.
    step: the checkpoint to trace (default: the newest).
    with_probs: also store the router's full output distribution.

  Returns:
    write_trace's summary plus {'step'}.
  """
  if jax.process_count() > 1:
    # Every process would write its own data slice into the same step
    # folder, each numbering its sequences from 0.
    raise ValueError(
        f'--mode=trace is single-process; this run has '
        f'{jax.process_count()} processes: trace the checkpoint from one')
  if config.get('model_name') == 'llava':
    return vlm_tracing.trace_vlm_checkpoint(config, workdir, step=step,
                                            with_probs=with_probs)
  workdir = os.path.abspath(workdir)
  require_routing(config, 'trace')
  run = restore.restore_run(config, workdir, step, what='trace')
  pipeline = from_config.build_data(config, workdir)
  summary = trace_state(routing_fn(run.model, with_probs=with_probs),
                        run.params, run.router_state, pipeline,
                        os.path.join(workdir, 'traces'), run.step)
  return {**summary, 'step': run.step}


def trace_state(route, params, router_state, pipeline, directory: str,
                step: int) -> dict[str, Any]:
  """Traces (params, router_state) over the pipeline's validation set.

  Args:
    route: routing_fn(model, ...) (jit it once and reuse across steps).
    params, router_state: the model's variables (any sharding).
    pipeline: a data Pipeline with a validation set.
    directory: the traces root; writes `<directory>/step=<step>/`.
    step: the step the variables belong to.

  Returns:
    write_trace's summary.
  """
  def batches():
    for batch in pipeline.valid_iterator():
      tokens = np.asarray(batch['inputs'])
      layers = jax.device_get(route(params, router_state, tokens))
      yield tokens, batch.get('domain'), layers

  return trace_lib.write_trace(directory, step, batches())
