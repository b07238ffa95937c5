"""Recording a VLM's image routing (vision tower, projector) into traces.

The VLM counterpart of moe_jax/analysis/tracing.py: a LLaVA checkpoint
(models/llava.py) runs over labelled image sets and the routing of every
image token in every MoE layer of the vision tower and the projector goes
into the trace format of moe_jax/trace.py, so moe_jax.analysis.report and
the notebook show LibMoE's VLM router statistics (algorithms.md §8.4, §9:
weight entropy, router margin, allocation entropy per task, overlaps).

  trace_vlm_checkpoint(config, workdir)   a run's checkpoint; what
                                          `python -m moe_jax.main
                                          --mode=trace` calls for a VLM run
  trace_images(model, variables, images, directory, step)
                                          any (model, variables) over
                                          (task, image) lists

Rows. One row per (image token, MoE layer), as in moe_jax/trace.py:
  sequence  the image's index in the traced set (tasks in order, then the
            images of each task in order; listed in `_images.json`)
  position  the token's row in that layer's input for the image: at an S²
            scale s the tower runs on s x s crops (crop-major, vision.py
            multiscale_features), so position = crop * n + j for row j of
            crop `crop` (n rows per crop); the projector's rows are the
            merged feature rows 0..N-1
  token     the patch the row belongs to: its index in the scale's full
            (s h) x (s w) patch grid, row-major (at scale 1 and in the
            projector: the patch index, so the same patch has the same
            `token` in every layer); -1 for CLIP's class token
  domain    the image's task index (names in `_domains.json`)
Layers (the `layer=<l>` partitions) are the MoE aux entries of the image
path in the model's order: the tower's layers at the first S² scale, ... at
the last scale, then the projector. The LLM's MoE layers (when the LLM is
MoE; LibMoE's is dense) route text tokens and are not traced here.

Sidecars in `traces/step=<N>/` (underscore names, which pyarrow's dataset
discovery skips, so read_trace still reads only the Parquet parts):
  _layers.json   [{layer, name ('vision/layer_3@scale1', 'projector'),
                   site ('vision' | 'projector'), scale, tower_layer,
                   width E', tokens_per_image}, ...]
  _domains.json  the task names, index = the `domain` value
  _images.json   the traced image paths, index = `sequence`
moe_jax/analysis/report.py reads the first two (layer names, E', task
names, the tower / projector grouping).

Default tasks (trace_vlm_checkpoint with tasks=None): the images of the
run's validation samples (config.data.eval_path, at most eval_batches x
global_batch images, file order, each image once), labelled by the samples'
'category' (MME-style) or 'task' field when every one has it; for the
built-in shapes set (data/tiny_vlm.py) by the image's shape (square /
circle / triangle, from eval.jsonl); otherwise all one task named after the
JSON file.

Dimension legend: B images per batch, H, W image size, C channels, s an S²
scale, n token rows per crop, N feature rows per image, K slots, E' router
output width, L traced layers.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import shutil
import tempfile
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from moe_jax import restore
from moe_jax import run_log
from moe_jax import trace as trace_lib
from moe_jax.data import images as images_lib
from moe_jax.data import tiny_vlm

LAYERS_FILE = '_layers.json'
DOMAINS_FILE = '_domains.json'
IMAGES_FILE = '_images.json'
# Sample fields that name a validation image's task, first found wins.
TASK_FIELDS = ('category', 'task')


# ------------------------------------------------------------ the layers ---

def layer_infos(model) -> list[dict[str, Any]]:
  """What each traced layer is, aligned with the image path's aux entries.

  Args:
    model: a models.llava.Llava.

  Returns:
    One dict per tower MoE layer (per S² scale x layer) then the projector:
    {'layer', 'name', 'site', 'scale', 'tower_layer'} ('scale' and
    'tower_layer' None for the projector).
  """
  infos = []
  if model.tower_ffn == 'moe':
    for scale in model.s2_scales:
      for i in range(model.tower['num_layers']):
        infos.append({'name': f'vision/layer_{i}@scale{scale}',
                      'site': 'vision', 'scale': int(scale),
                      'tower_layer': i})
  if model.projector_ffn == 'moe':
    infos.append({'name': 'projector', 'site': 'projector', 'scale': None,
                  'tower_layer': None})
  if not infos:
    raise ValueError("vlm.tower_ffn, vlm.projector_ffn: both 'dense': the "
                     'vision tower and projector route nothing to trace')
  return [dict(info, layer=l) for l, info in enumerate(infos)]


def image_routing_fn(model):
  """jit: (variables, images [B, H, W, C]) -> per-layer image-token routing.

  Runs the whole model on one placeholder text token per image (no image
  positions, so nothing is spliced; the LLM's cost is negligible) and keeps
  the aux entries of the image path (layer_infos).

  Returns:
    A list over layer_infos of {'choice' [T_l, K] int32, 'weight' [T_l, K],
    'top1' [T_l], 'probs' [T_l, E']}, T_l the layer's token rows for the
    batch, in the model's order (at scale s: crop-major, [s², B, n]
    flattened).
  """
  num_layers = len(layer_infos(model))
  # Any id other than the image token: the text row takes no image rows.
  text_id = 0 if model.image_token_id != 0 else 1

  def fn(variables, images):
    tokens = jnp.full((images.shape[0], 1), text_id, jnp.int32)  # [B, 1]
    _, auxes = model.apply(variables, tokens, images, train=False)
    keep = ('choice', 'weight', 'top1', 'probs')
    return [{k: aux['routing'][k] for k in keep} for aux in auxes[:num_layers]]
  return jax.jit(fn)


def _class_rows(model, info: Mapping[str, Any]) -> int:
  """1 when the layer's rows start with CLIP's class token, else 0."""
  clip = model.tower['kind'] == 'clip'
  if info['site'] == 'vision':
    return int(clip)
  return int(clip and model.tower.get('feature_select', 'patch') == 'full')


def token_layout(model, info: Mapping[str, Any], rows: int, batch: int
                 ) -> tuple[np.ndarray, np.ndarray]:
  """(order [B, s² n], token [s² n]): the layer's rows per image.

  Args:
    model: the Llava.
    info: the layer's layer_infos entry.
    rows: T_l, the layer's routing rows for the batch.
    batch: B.

  Returns:
    order: row indices into the layer's [T_l] rows, image by image, crop by
      crop (positions 0.. of the trace); token: each position's patch index
      in the scale's (s h) x (s w) grid (-1 for CLIP's class token).
  """
  scale = info['scale'] or 1
  crops = scale * scale
  if rows % (crops * batch):
    raise ValueError(f"layer {info['name']}: {rows} routing rows for "
                     f'{batch} images at S² scale {scale}: expected a '
                     f'multiple of {crops * batch}')
  n = rows // (crops * batch)
  cls = _class_rows(model, info)
  order = np.arange(rows).reshape(crops, batch, n)         # [s², B, n]
  order = order.transpose(1, 0, 2).reshape(batch, crops * n)
  patches = n - cls
  if scale == 1:
    grid_index = np.arange(patches)[None]                  # [1, n - cls]
  else:
    side = math.isqrt(patches)
    if side * side != patches:
      raise ValueError(f"layer {info['name']}: {patches} patches per crop "
                       'do not form a square grid (S² needs one)')
    r, q = np.divmod(np.arange(patches), side)             # in-crop row/col
    ci, cj = np.divmod(np.arange(crops), scale)            # crop row/col
    grid_index = ((ci[:, None] * side + r[None]) * (scale * side)
                  + cj[:, None] * side + q[None])          # [s², n - cls]
  token = np.concatenate(
      [np.full((grid_index.shape[0], cls), -1), grid_index], axis=1)
  return order, np.broadcast_to(token, (crops, n)).reshape(-1)


# ------------------------------------------------------------- recording ---

def _batches(images: Sequence[np.ndarray], domains: Sequence[int],
             batch_size: int):
  """(images [B, H, W, C] padded to batch_size, domain [b], b real rows)."""
  for start in range(0, len(images), batch_size):
    chunk = np.stack(images[start:start + batch_size])
    b = len(chunk)
    if b < batch_size:
      # One compiled shape: pad with zero images, dropped after routing.
      pad = np.zeros((batch_size - b,) + chunk.shape[1:], chunk.dtype)
      chunk = np.concatenate([chunk, pad])
    yield chunk, np.asarray(domains[start:start + b], np.int32), b


def _write_layers(directory: str, step: int,
                  per_layer: list[list[tuple]]) -> dict[str, Any]:
  """Writes one trace step whose layers have different token layouts.

  write_trace takes one [B, S] token layout for all layers; here the tower's
  S² layers have s² n rows per image and the projector N. Each layer is
  written by write_trace on its own into a staging directory, then the
  layer partitions are assembled and swapped in whole (as write_trace does).
  """
  os.makedirs(directory, exist_ok=True)
  staging = tempfile.mkdtemp(dir=directory, prefix=f'.step={step}.vlm-')
  try:
    assembled = os.path.join(staging, 'step')
    os.makedirs(assembled)
    rows = 0
    for l, batches in enumerate(per_layer):
      part = os.path.join(staging, f'.part{l}')
      summary = trace_lib.write_trace(part, step, batches)
      rows += summary['rows']
      os.replace(os.path.join(summary['path'], 'layer=0'),
                 os.path.join(assembled, f'layer={l}'))
    final = os.path.join(directory, f'step={step}')
    if os.path.exists(final):
      shutil.rmtree(final)
    os.replace(assembled, final)
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  return {'rows': rows, 'layers': len(per_layer), 'path': final}


def trace_images(model, variables: Mapping[str, Any],
                 images: Sequence[np.ndarray], directory: str, step: int, *,
                 domains: Sequence[int] | None = None,
                 domain_names: Sequence[str] = (),
                 image_names: Sequence[str] = (),
                 batch_size: int = 8, with_probs: bool = False,
                 route=None) -> dict[str, Any]:
  """Traces the image path's routing of `images` into `<directory>/step=N`.

  Args:
    model: a models.llava.Llava with an MoE tower and / or projector.
    variables: {'params', optionally 'router_state'} for model.apply.
    images: preprocessed [H, W, C] float32 images, one per traced sequence.
    directory: the traces root (e.g. <workdir>/traces).
    step: the checkpoint step the variables belong to.
    domains: each image's task index (default -1: unlabelled).
    domain_names: the task names (written to _domains.json).
    image_names: each image's path (written to _images.json).
    batch_size: images per forward (the last batch is zero-padded).
    with_probs: also store the router's full distribution (prob_<e>).
    route: image_routing_fn(model), to reuse one compiled function.

  Returns:
    {'rows': token-layer rows written, 'layers': L, 'path': the step dir,
     'images': images traced}.
  """
  if not len(images):
    raise ValueError('trace_images: no images to trace')
  domains = ([-1] * len(images) if domains is None else list(domains))
  if len(domains) != len(images):
    raise ValueError(f'domains: expected one per image ({len(images)}), '
                     f'got {len(domains)}')
  infos = layer_infos(model)
  route = route or image_routing_fn(model)
  per_layer: list[list[tuple]] = [[] for _ in infos]
  widths, counts = [0] * len(infos), [0] * len(infos)
  for batch, domain, b in _batches(images, domains, batch_size):
    layers = jax.device_get(route(variables, batch))
    for l, (info, layer) in enumerate(zip(infos, layers)):
      order, token = token_layout(model, info, len(layer['choice']),
                                  batch_size)
      order = order[:b].reshape(-1)                        # real images
      keep = ('choice', 'weight', 'top1') + (('probs',) if with_probs else ())
      rows = {k: np.asarray(layer[k])[order] for k in keep}
      tokens = np.broadcast_to(token, (b, token.size))     # [b, s² n]
      per_layer[l].append((tokens, domain, [rows]))
      widths[l] = int(np.shape(layer['probs'])[-1])
      counts[l] = int(token.size)
  summary = _write_layers(directory, step, per_layer)
  step_dir = summary['path']
  tiny_vlm.dump_json(os.path.join(step_dir, LAYERS_FILE),
                     [dict(info, width=w, tokens_per_image=n)
                      for info, w, n in zip(infos, widths, counts)])
  tiny_vlm.dump_json(os.path.join(step_dir, DOMAINS_FILE), list(domain_names))
  tiny_vlm.dump_json(os.path.join(step_dir, IMAGES_FILE), list(image_names))
  return {**summary, 'images': len(images)}


# ------------------------------------------------------------------ tasks ---

def _read_json_list(path: str) -> list:
  if not os.path.isfile(path):
    raise FileNotFoundError(f'config.data.eval_path: {path!r}: no such file '
                            '(the validation samples whose images are '
                            'traced; or pass tasks=)')
  with open(path, encoding='utf-8') as f:
    samples = json.load(f)
  if not isinstance(samples, list):
    raise ValueError(f'{path}: expected a JSON list of LLaVA samples')
  return samples


def _shape_labels(image_dir: str) -> dict[str, str] | None:
  """image -> shape for the built-in shapes set (None for other sets)."""
  meta = os.path.join(image_dir, tiny_vlm.META)
  eval_jsonl = os.path.join(image_dir, 'eval.jsonl')
  if not (os.path.isfile(meta) and os.path.isfile(eval_jsonl)):
    return None
  with open(meta, encoding='utf-8') as f:
    if json.load(f).get('kind') != 'shapes':
      return None
  labels = {}
  with open(eval_jsonl, encoding='utf-8') as f:
    for line in f:
      item = json.loads(line)
      if item['question'] == tiny_vlm.SHAPE_QUESTION:
        labels[item['image']] = item['answer']
  return labels


def default_tasks(config: ml_collections.ConfigDict,
                  max_images: int | None = None) -> dict[str, list[str]]:
  """The run's validation images grouped by task (module docstring).

  Args:
    config: the run's resolved config (data.eval_path, data.image_dir).
    max_images: at most this many images (default: train.eval_batches x
      train.global_batch, the validation samples the run evaluates on).

  Returns:
    {task name: image paths relative to data.image_dir}, tasks sorted.
  """
  path = config.data.eval_path
  if not path:
    raise ValueError('config.data.eval_path is empty: no validation images '
                     'to trace; pass tasks={name: [image paths]}')
  samples = _read_json_list(path)
  if max_images is None:
    max_images = config.train.eval_batches * config.train.global_batch
  images, seen = [], set()
  for sample in samples:
    image = sample.get('image') if isinstance(sample, dict) else None
    if image and image not in seen:
      seen.add(image)
      images.append((image, sample))
    if len(images) == max_images:
      break
  if not images:
    raise ValueError(f'{path}: no sample with an image to trace')
  for field in TASK_FIELDS:
    if all(isinstance(s.get(field), str) for _, s in images):
      labels = [s[field] for _, s in images]
      break
  else:
    shapes = _shape_labels(config.data.image_dir)
    stem = os.path.splitext(os.path.basename(path))[0]
    labels = [shapes.get(image, stem) if shapes else stem
              for image, _ in images]
  tasks = collections.defaultdict(list)
  for (image, _), label in zip(images, labels):
    tasks[label].append(image)
  return dict(sorted(tasks.items()))


def _resolved(config: ml_collections.ConfigDict | None, workdir: str
              ) -> ml_collections.ConfigDict:
  """The config itself when resolved, else the run's config.json.

  `--mode=trace` passes the experiment file's config, whose model sizes,
  tokenizer and data paths are only filled at training start-up
  (convert/init_vlm.py); the run's config.json has them.
  """
  if config is not None and config.vision.get('d_model') is not None:
    return config
  return run_log.load_saved_config(workdir)


def trace_vlm_checkpoint(config: ml_collections.ConfigDict | None,
                         workdir: str,
                         tasks: Mapping[str, Sequence[str]] | None = None, *,
                         step: int | None = None, with_probs: bool = False,
                         max_images: int | None = None) -> dict[str, Any]:
  """Traces a VLM run's checkpoint over labelled image sets.

  Args:
    config: the run's config (unresolved: the workdir's config.json is
      used; None: the same).
    workdir: the run directory; traces go to `<workdir>/traces/`.
    tasks: {task name: image paths (absolute, or relative to
      config.data.image_dir)}; None: default_tasks(config, max_images).
    step: the checkpoint to trace (default: the newest).
    with_probs: also store the router's full output distribution.
    max_images: cap of the default tasks' images.

  Returns:
    trace_images' summary plus {'step', 'tasks': {name: images}}.
  """
  workdir = os.path.abspath(workdir)
  config = _resolved(config, workdir)
  if config.get('model_name') != 'llava':
    raise ValueError(f"model_name={config.get('model_name')!r}: "
                     "trace_vlm_checkpoint traces VLM runs ('llava'); "
                     'moe_jax.analysis.tracing.trace_checkpoint traces LMs')
  if tasks is None:
    tasks = default_tasks(config, max_images)
  run = restore.restore_run(config, workdir, step, what='trace')
  layer_infos(run.model)        # a dense tower and projector: clear error
  data = config.data
  spec = images_lib.ImageSpec.from_preprocessor_config(data.image_processor)
  spec = dataclasses.replace(
      spec, aspect=data.get('image_aspect') or spec.aspect)
  images, domains, names = [], [], []
  for d, (task, paths) in enumerate(tasks.items()):
    for path in paths:
      full = os.path.join(data.get('image_dir') or '', path)
      images.append(images_lib.load_image(full, spec, sample=f'{task}/{path}'))
      domains.append(d)
      names.append(path)
  summary = trace_images(
      run.model, run.variables, images, os.path.join(workdir, 'traces'),
      run.step, domains=domains, domain_names=list(tasks), image_names=names,
      batch_size=config.train.global_batch, with_probs=with_probs)
  return {**summary, 'step': run.step,
          'tasks': {name: len(paths) for name, paths in tasks.items()}}
