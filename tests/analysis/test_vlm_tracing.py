"""VLM routing traces: a tiny Llava's tower / projector routing, as rows.

The tiny model has a SigLIP-style 3-layer tower and a projector, both MoE
(smoe, E=4, k=2), with S² scales (1, 2): 3 layers at scale 1, 3 at scale 2
(4 crops per image), then the projector. The reference is model.apply on
ONE image at a time (B=1: the aux rows of a scale-2 layer are then simply
crop 0's tokens, crop 1's, ...), against the traced rows of a batched,
zero-padded run (B=2 over 5 images); the patch index of the merged grid is
rebuilt with numpy slicing (s2wrapper's split_chessboard order).
"""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from moe_jax import trace as trace_lib
from moe_jax.analysis import report
from moe_jax.analysis import tracing
from moe_jax.analysis import vlm_tracing
from moe_jax.data import tiny_vlm
from moe_jax.models import llava

TOWER = dict(kind='siglip', image_size=16, patch_size=4, d_model=16,
             num_layers=3, num_heads=2, mlp_width=24,
             activation='gelu_tanh', norm_eps=1e-6)
LLM = dict(vocab_size=32, d_model=16, num_layers=1, num_heads=2, head_dim=8,
           num_kv_heads=2, dense_ffn=True,
           ffn=dict(d_model=16, width=16, activation='swiglu',
                    use_bias=False),
           norm='rmsnorm', norm_eps=1e-5, kv_projection='separate',
           rope_fraction=1.0, output_bias=False)
MOE = dict(router='smoe', num_experts=4, top_k=2, backend='loop',
           balance_count_mode='top1', balance_group='sequence',
           losses=('balance',))
N = 16                               # (16 / 4)² patches per image / crop
DOMAINS = [0, 1, 0, 2, 1]
NAMES = ['circle', 'square', 'triangle']


def _model(**overrides):
  kwargs = dict(tower=TOWER, llm=LLM, projector_width=16, image_token_id=5,
                tower_ffn='moe', projector_ffn='moe', moe=MOE,
                s2_scales=(1, 2))
  return llava.Llava(**{**kwargs, **overrides})


@pytest.fixture(scope='module')
def traced(tmp_path_factory):
  model = _model()
  # Random parameters of the init's shapes (model.init would compile or
  # run eagerly for many seconds; any values route tokens somewhere).
  shapes = nn.unbox(jax.eval_shape(
      lambda key: model.init(key, **model.example_inputs(1)),
      jax.random.key(0)))
  rng = np.random.default_rng(1)
  variables = jax.tree.map(
      lambda a: jnp.asarray(rng.normal(0, 0.3, a.shape), a.dtype), shapes)
  images = np.random.default_rng(0).normal(
      size=(len(DOMAINS), 16, 16, 3)).astype(np.float32)
  workdir = tmp_path_factory.mktemp('vlm_run')
  summary = vlm_tracing.trace_images(
      model, variables, list(images), str(workdir / 'traces'), 7,
      domains=DOMAINS, domain_names=NAMES,
      image_names=[f'img{i}.png' for i in range(len(DOMAINS))],
      batch_size=2)
  # Reference: one image per forward; tokens hold no image position.
  apply = jax.jit(lambda v, x: model.apply(
      v, jnp.zeros((1, 1), jnp.int32), x)[1])
  reference = [[jax.device_get(aux['routing'])
                for aux in apply(variables, images[i:i + 1])]
               for i in range(len(DOMAINS))]
  return model, workdir, summary, reference


def _grid_tokens(scale):
  """Each crop row's patch index in the (s h) x (s w) grid, crop-major."""
  side = 4
  grid = np.arange((scale * side) ** 2).reshape(scale * side, scale * side)
  crops = [grid[i * side:(i + 1) * side, j * side:(j + 1) * side]
           for i in range(scale) for j in range(scale)]
  return np.concatenate([c.reshape(-1) for c in crops])


def test_rows_match_a_direct_apply_per_image(traced):
  model, workdir, summary, reference = traced
  scales = [1, 1, 1, 2, 2, 2, None]
  assert summary['layers'] == 7 and summary['images'] == 5
  # 5 images x (3 x 16 + 3 x 64 + 16) rows.
  assert summary['rows'] == 5 * (3 * N + 3 * 4 * N + N)
  for layer, scale in enumerate(scales):
    frame = trace_lib.read_trace(str(workdir / 'traces'), step=7,
                                 layer=layer)
    frame = frame.sort_values(['sequence', 'position'])
    n = N * (scale or 1) ** 2
    assert len(frame) == 5 * n, layer
    for i in range(5):
      rows = frame[frame['sequence'] == i]
      np.testing.assert_array_equal(rows['position'], np.arange(n))
      assert (rows['domain'] == DOMAINS[i]).all()
      want = reference[i][layer]
      np.testing.assert_array_equal(
          rows[['choice_0', 'choice_1']].to_numpy(), want['choice'])
      np.testing.assert_allclose(
          rows[['weight_0', 'weight_1']].to_numpy(), want['weight'],
          rtol=1e-5, atol=1e-6)
      np.testing.assert_array_equal(
          rows['token'], _grid_tokens(scale) if scale else np.arange(N))
    assert not any(c.startswith('prob_') for c in frame.columns)


def test_sidecars_name_layers_tasks_and_images(traced):
  _, workdir, _, _ = traced
  step_dir = workdir / 'traces' / 'step=7'
  layers = json.loads((step_dir / '_layers.json').read_text())
  assert [e['name'] for e in layers] == [
      'vision/layer_0@scale1', 'vision/layer_1@scale1',
      'vision/layer_2@scale1', 'vision/layer_0@scale2',
      'vision/layer_1@scale2', 'vision/layer_2@scale2', 'projector']
  assert [e['layer'] for e in layers] == list(range(7))
  assert {e['width'] for e in layers} == {4}
  assert [e['tokens_per_image'] for e in layers] == [16] * 3 + [64] * 3 + [16]
  assert json.loads((step_dir / '_domains.json').read_text()) == NAMES
  assert json.loads((step_dir / '_images.json').read_text())[4] == 'img4.png'


def test_report_shows_vlm_statistics(traced):
  _, workdir, _, reference = traced
  # A VLM's LLM is dense: the run is still labelled by its router.
  (workdir / 'config.json').write_text(json.dumps(
      {'model_name': 'llava', 'model': {'dense_ffn': True},
       'vlm': {'tower_ffn': 'moe', 'projector_ffn': 'moe'},
       'moe': {'router': 'smoe'}}))
  run = report.load_run(str(workdir))
  assert run.label == 'smoe' and run.mean_layers == list(range(6))
  report.build_report(str(workdir))
  summary = (workdir / 'report' / 'summary.md').read_text()
  assert "E' = 4" in summary
  assert '| vision/layer_2@scale2 |' in summary
  assert '## Router statistics by site' in summary
  assert '## Expert overlap between domains' in summary
  assert (workdir / 'report' / 'domain_overlap.png').read_bytes()[:4] == (
      b'\x89PNG')
  sites = {line.split('|')[1].strip(): [c.strip() for c in line.split('|')]
           for line in summary.split('## Router statistics by site')[1]
           .split('Allocation entropy per task')[0].splitlines()
           if line.startswith('| ')}
  # Weight entropy of the tower: per-token H(w / Σw), mean over the 5
  # images' tokens of each layer, then over the 6 tower layers (numpy on
  # the reference routing).
  def layer_entropy(layer):
    w = np.concatenate([reference[i][layer]['weight'] for i in range(5)])
    p = w / w.sum(1, keepdims=True)
    return np.mean(-(p * np.log(p)).sum(1))
  tower = np.mean([layer_entropy(l) for l in range(6)])
  assert sites['vision tower'][3] == f'{tower:.4f}'
  assert sites['projector'][3] == f'{layer_entropy(6):.4f}'
  assert sites['vision tower @scale2'][2] == '3'
  # Tasks named in the per-task tables.
  for name in NAMES:
    assert f'| {name} ' in summary
  # Token-level pairs only within a scale: not across scales (2-3) nor
  # between scale 2's crops and the projector's rows (5-6).
  pairs = [line.split('|')[1].strip() for line in summary.splitlines()
           if line.startswith('| ') and '-' in line.split('|')[1]]
  assert pairs == ['0-1', '1-2', '3-4', '4-5']


def test_clip_class_token_is_minus_one_and_first():
  model = _model(tower=dict(TOWER, kind='clip', activation='quick_gelu'),
                 s2_scales=(1,))
  infos = vlm_tracing.layer_infos(model)
  # Tower rows: class token + 16 patches; 2 images.
  order, token = vlm_tracing.token_layout(model, infos[0], 2 * 17, 2)
  np.testing.assert_array_equal(token, np.arange(-1, 16))
  np.testing.assert_array_equal(order[1], np.arange(17, 34))
  # Projector rows: the 16 patch features ('patch' feature select).
  _, token = vlm_tracing.token_layout(model, infos[-1], 2 * 16, 2)
  np.testing.assert_array_equal(token, np.arange(16))


def test_dense_tower_and_projector_is_a_clear_error():
  with pytest.raises(ValueError, match='route nothing to trace'):
    vlm_tracing.layer_infos(_model(tower_ffn='dense', projector_ffn='dense'))


def _config(eval_path, image_dir):
  return ml_collections.ConfigDict(dict(
      data=dict(eval_path=str(eval_path), image_dir=str(image_dir)),
      train=dict(eval_batches=1, global_batch=4)))


def test_default_tasks_of_the_shapes_set_are_the_shapes(tmp_path):
  shapes = tiny_vlm.write_shapes_dataset(tmp_path / 'shapes', num_train=1,
                                         num_eval=6, image_size=8)
  tasks = vlm_tracing.default_tasks(
      _config(shapes.sft_valid_json, shapes.image_dir), max_images=6)
  # The shape is the caption's last word ('a red circle').
  captions = json.loads(open(shapes.pretrain_valid_json).read())
  want = {}
  for sample in captions:
    want.setdefault(sample['conversations'][1]['value'].split()[-1],
                    []).append(sample['image'])
  assert tasks == dict(sorted(want.items()))
  # The default cap: eval_batches x global_batch images.
  capped = vlm_tracing.default_tasks(
      _config(shapes.sft_valid_json, shapes.image_dir))
  assert sum(len(v) for v in capped.values()) == 4


def test_default_tasks_use_a_category_field_else_the_file_name(tmp_path):
  samples = [{'id': str(i), 'image': f'{i}.png', 'category': c,
              'conversations': []} for i, c in enumerate('abab')]
  samples.append({'id': 'text', 'conversations': []})
  path = tmp_path / 'bench.json'
  path.write_text(json.dumps(samples))
  assert vlm_tracing.default_tasks(_config(path, tmp_path)) == {
      'a': ['0.png', '2.png'], 'b': ['1.png', '3.png']}
  for sample in samples:
    sample.pop('category', None)
  path.write_text(json.dumps(samples))
  assert vlm_tracing.default_tasks(_config(path, tmp_path)) == {
      'bench': ['0.png', '1.png', '2.png', '3.png']}


def test_trace_checkpoint_dispatches_vlm_runs(monkeypatch):
  calls = []
  monkeypatch.setattr(vlm_tracing, 'trace_vlm_checkpoint',
                      lambda *a, **k: calls.append((a, k)) or {'step': 3})
  config = ml_collections.ConfigDict(dict(model_name='llava'))
  assert tracing.trace_checkpoint(config, '/w', with_probs=True) == {
      'step': 3}
  assert calls == [((config, '/w'), {'step': None, 'with_probs': True})]


def test_trace_checkpoint_is_single_process(monkeypatch):
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  config = ml_collections.ConfigDict(dict(model_name='llava'))
  with pytest.raises(ValueError, match='single-process; this run has 2'):
    tracing.trace_checkpoint(config, '/w')


def test_lm_traces_report_as_before(tmp_path):
  """No sidecars: no site section, layers by index, E' from the ids."""
  choice = np.array([[0, 1], [2, 3]])
  weight = np.array([[.75, .25], [.5, .5]], np.float32)
  trace_lib.write_trace(str(tmp_path / 'traces'), 1, [
      (np.array([[1, 2]]), None, [{'choice': choice, 'weight': weight}])])
  run = report.load_run(str(tmp_path))
  assert run.width == 4 and run.groups() == {'all layers': [0]}
  ctx = report.Context(runs=[run], out_dir=str(tmp_path))
  assert report.site_summary_section(ctx) is None
  assert report.domain_overlap_section(ctx) is None
