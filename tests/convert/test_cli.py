"""python -m moe_jax.convert: tiny -> inspect -> import / upcycle -> export.

The subcommands run in-process through main(argv) (one subprocess checks the
real exit status). A dense import exported back is the same checkpoint,
tensor for tensor; an upcycled run exported to Mixtral computes, in
transformers, the logits of the moe_jax model restored from the workdir; the
imported workdir is traced and trained on by the training loop from its
step-0 checkpoint; a PT-stage VLM workdir exported --to=llava computes, in
transformers' LlavaForConditionalGeneration, the restored model's logits
(an MoE tower is refused); errors are one line with exit status 2.
"""

import json
import os
import pathlib
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import checkpoint as checkpoint_lib
from moe_jax import config_lib
from moe_jax import models
from moe_jax import restore
from moe_jax import run_log
from moe_jax import state as state_lib
from moe_jax import train
from moe_jax import vlm_experiment
from moe_jax.analysis import tracing
from moe_jax.convert import __main__ as cli
from moe_jax.convert import hf_import
from moe_jax.convert import init_vlm
from moe_jax.convert import safetensors_io

REPO = pathlib.Path(__file__).resolve().parents[2]
ERROR = 'moe_jax.convert: error: '


def run(capsys, *argv):
  """(exit status, stdout, stderr) of main(argv)."""
  status = cli.main([str(a) for a in argv])
  out, err = capsys.readouterr()
  return status, out, err


def jax_leaves(tree):
  """The arrays of a nested dict."""
  if isinstance(tree, dict):
    for value in tree.values():
      yield from jax_leaves(value)
  else:
    yield tree


@pytest.fixture(scope='module')
def llama(tmp_path_factory):
  directory = tmp_path_factory.mktemp('hf') / 'llama'
  assert cli.main(['tiny', '--family=llama', f'--out={directory}']) == 0
  return directory


def test_inspect_maps_every_key(llama, capsys):
  status, out, _ = run(capsys, 'inspect', f'--hf_dir={llama}')
  assert status == 0
  assert 'architecture: LlamaForCausalLM (family llama, dense)' in out
  checkpoint = safetensors_io.ShardedCheckpoint(llama)
  rows = {line.split()[0]: line for line in out.splitlines()
          if line.startswith(('model.', 'lm_head'))}
  assert set(rows) == set(checkpoint.keys())
  assert rows['model.layers.1.mlp.up_proj.weight'].endswith(
      'layer_1/ffn/ffn/w_in (part 2 of 2)')
  assert '(128, 64)  float32' in rows['model.layers.1.mlp.up_proj.weight']
  _, params, _ = hf_import.import_hf(str(llama), progress=False)
  total = sum(np.size(a) for a in jax_leaves(params))
  assert f'parameters: {total:,} in {len(rows)} tensors' in out


def test_import_then_export_dense_is_the_same_checkpoint(llama, tmp_path,
                                                         capsys):
  workdir, out = tmp_path / 'run', tmp_path / 'out'
  status, text, _ = run(capsys, 'import', f'--hf_dir={llama}',
                        f'--workdir={workdir}')
  assert status == 0, text
  assert 'train: python -m moe_jax.main --config=configs/dense_154m.py:tiny' \
      in text
  # Step 0 holds the state and no iterator state (no data read yet).
  assert sorted(os.listdir(workdir)) == ['checkpoints', 'config.json']
  assert os.listdir(workdir / 'checkpoints') == ['0']
  assert not (workdir / 'checkpoints' / '0' / 'data').exists()
  config = json.loads((workdir / 'config.json').read_text())
  assert config['init']['hf_path'] == str(llama)
  assert config['data']['tokenizer'] == str(llama)

  status, text, _ = run(capsys, 'export', f'--workdir={workdir}',
                        '--to=dense', f'--out={out}')
  assert status == 0, text
  source = safetensors_io.ShardedCheckpoint(llama)
  exported = safetensors_io.ShardedCheckpoint(out)
  assert exported.keys() == source.keys()
  for key in source.keys():
    np.testing.assert_array_equal(exported.get(key), source.get(key))
  for name in ('config.json', 'tokenizer.json', 'tokenizer_config.json',
               'generation_config.json'):
    assert (out / name).read_bytes() == (llama / name).read_bytes(), name


def test_upcycle_exports_to_mixtral_with_the_same_logits(llama, tmp_path,
                                                         capsys):
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  workdir, out = tmp_path / 'run', tmp_path / 'mixtral'
  status, text, _ = run(capsys, 'upcycle', f'--hf_dir={llama}',
                        '--router=smoe', '--num_experts=4', '--top_k=2',
                        '--noise=0.05', '--seed=3', f'--workdir={workdir}')
  assert status == 0, text
  assert '--config.init.upcycle.noise=0.05' in text
  assert '--to=mixtral' in text
  status, text, _ = run(capsys, 'export', f'--workdir={workdir}',
                        '--to=mixtral', f'--out={out}')
  assert status == 0, text
  assert 'as MixtralForCausalLM' in text

  tokens = np.random.default_rng(0).integers(0, 512, (2, 12))
  model = transformers.AutoModelForCausalLM.from_pretrained(
      out, dtype=torch.float32, local_files_only=True).eval()
  with torch.no_grad():
    want = model(input_ids=torch.tensor(tokens)).logits.numpy()
  restored = restore.restore_run(cli.config_from_workdir(str(workdir)),
                                 str(workdir))
  got, _ = restored.model.apply(restored.variables,
                                jnp.asarray(tokens, jnp.int32))
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=1e-4)
  auto = transformers.AutoTokenizer.from_pretrained(out,
                                                    local_files_only=True)
  assert len(auto) == 512


def test_upcycled_workdir_traces_and_trains_on(llama, tmp_path, capsys):
  workdir = tmp_path / 'run'
  status, text, _ = run(capsys, 'upcycle', f'--hf_dir={llama}',
                        '--router=smoe', '--num_experts=4', '--top_k=2',
                        f'--workdir={workdir}')
  assert status == 0, text
  command = next(line for line in text.splitlines()
                 if line.startswith('train: '))
  # The config and overrides the command prints, as main.py would apply.
  spec = command.split('--config=')[1].split()[0]
  config = config_lib.load_config(str(REPO / spec))
  config.init.hf_path = str(llama)

  traced = tracing.trace_checkpoint(config, str(workdir))
  assert traced['step'] == 0 and traced['layers'] == 2

  config.train.steps = 2
  config.train.warmup_steps = 0
  config.train.eval_every = 2
  config.train.checkpoint_every = 2
  summary = train.train_and_evaluate(config, str(workdir))
  assert summary['step'] == 2 and np.isfinite(summary['last_loss'])
  # Resumed, not restarted: step 0 is still the imported checkpoint.
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['0', '2']
  records = [json.loads(line) for line in
             (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert [r['step'] for r in records if r['split'] == 'train'] == [1, 2]


def test_errors_are_one_line_with_exit_status_2(llama, tmp_path, capsys):
  bad = tmp_path / 'bad'
  bad.mkdir()
  (bad / 'config.json').write_text(json.dumps(
      {'architectures': ['GPT2LMHeadModel']}))
  busy = tmp_path / 'busy'
  busy.mkdir()
  (busy / 'file').write_text('x')
  cases = [
      (['inspect', f'--hf_dir={tmp_path / "missing"}'], 'no config.json'),
      (['inspect', f'--hf_dir={bad}'], "architectures ['GPT2LMHeadModel'] "
       'is not one moe_jax imports'),
      (['import', f'--hf_dir={llama}', f'--workdir={busy}'],
       'exists and is not empty'),
      (['upcycle', f'--hf_dir={llama}', '--router=nope', '--num_experts=4',
        '--top_k=2', f'--workdir={tmp_path / "w"}'], 'router'),
      (['export', f'--workdir={tmp_path / "missing"}', '--to=dense',
        f'--out={tmp_path / "out"}'], 'no config.json'),
      (['tiny', f'--out={busy}'], 'exists'),
  ]
  for argv, message in cases:
    status, out, err = run(capsys, *argv)
    assert status == 2, argv
    assert err.startswith(ERROR) and err.count('\n') == 1, err
    assert message in err, (argv, err)
    assert not out
  assert not (tmp_path / 'w').exists() and not (tmp_path / 'out').exists()


def test_key_mismatch_and_refused_target_from_the_command_line(llama,
                                                                tmp_path):
  broken = tmp_path / 'broken'
  broken.mkdir()
  (broken / 'config.json').write_bytes((llama / 'config.json').read_bytes())
  tensors = dict(safetensors_io.ShardedCheckpoint(llama).items())
  del tensors['model.norm.weight']
  safetensors_io.write_safetensors(broken / 'model.safetensors', tensors)
  workdir = tmp_path / 'run'
  assert cli.main(['import', f'--hf_dir={llama}',
                   f'--workdir={workdir}']) == 0
  env = dict(os.environ, PYTHONPATH=str(REPO))
  for argv, message in (
      (['inspect', f'--hf_dir={broken}'], 'the checkpoint does not match '
       'its config.json: missing key model.norm.weight (expected shape '
       '(64,))'),
      (['export', f'--workdir={workdir}', '--to=mixtral',
        f'--out={tmp_path / "out"}'], '--to=mixtral: a dense model has no '
       'experts; use --to=dense')):
    done = subprocess.run([sys.executable, '-m', 'moe_jax.convert', *argv],
                          capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=300, check=False)
    assert done.returncode == 2, done.stderr
    # Log lines (orbax's warnings) may come first; the error is one line.
    errors = [line for line in done.stderr.splitlines()
              if line.startswith(ERROR)]
    assert len(errors) == 1 and done.stderr.endswith(errors[0] + '\n')
    assert message in errors[0]
    assert 'Traceback' not in done.stderr


def vlm_workdir(workdir):
  """A tiny PT-stage VLM run directory: resolved config.json and a step-0
  checkpoint of the stage's starting variables (random projector), as
  training would write them, without training."""
  config = vlm_experiment.experiment('smoe', 'pt', 'tiny')
  init_vlm.resolve(config, str(workdir))
  model = models.build(config)
  optimizer, _ = state_lib.make_optimizer(config.train)
  params, router_state = init_vlm.initial_variables(config, model)
  state = state_lib.TrainState(
      step=jnp.zeros((), jnp.int32), params=params,
      opt_state=optimizer.init(params), router_state=router_state,
      router_hook=state_lib.init_router_hook(config))
  checkpoints = checkpoint_lib.Checkpointer(
      os.path.join(workdir, 'checkpoints'), keep=1, asynchronous=False)
  try:
    checkpoints.save(0, state, None)
  finally:
    checkpoints.close()
  run_log.write_resolved_config(config, str(workdir))
  return config


def test_vlm_workdir_exports_to_llava(tmp_path, capsys):
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  workdir, out = tmp_path / 'pt', tmp_path / 'llava'
  config = vlm_workdir(workdir)
  status, text, err = run(capsys, 'export', f'--workdir={workdir}',
                          '--to=llava', f'--out={out}')
  assert status == 0, err
  assert 'as LlavaForConditionalGeneration (stage pt)' in text
  hf = transformers.LlavaForConditionalGeneration.from_pretrained(
      out, dtype=torch.float32, attn_implementation='eager',
      local_files_only=True).eval()
  processor = transformers.AutoProcessor.from_pretrained(
      out, local_files_only=True)
  assert type(processor).__name__ == 'LlavaProcessor'
  image_id = config.vlm.image_token_id
  rng = np.random.default_rng(0)
  tokens = rng.integers(7, config.model.vocab_size, (1, 24))
  tokens[0, 2:18] = image_id                        # N = (32 / 8)² rows
  images = rng.normal(size=(1, 32, 32, 3)).astype(np.float32)
  with torch.no_grad():
    want = hf(input_ids=torch.tensor(tokens),
              pixel_values=torch.tensor(images).permute(0, 3, 1, 2)
              ).logits.numpy()
  restored = restore.restore_run(cli.config_from_workdir(str(workdir)),
                                 str(workdir))
  got, _ = restored.model.apply(restored.variables,
                                jnp.asarray(tokens, jnp.int32),
                                jnp.asarray(images))
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=1e-4)
  capsys.readouterr()                 # transformers' progress bars

  # A VLM exports only as LLaVA; an MoE tower (SFT) is refused before the
  # checkpoint is read; --to=llava of an LM run is refused.
  sft = tmp_path / 'sft'
  sft.mkdir()
  saved = json.loads((workdir / 'config.json').read_text())
  saved['vlm']['tower_ffn'] = 'moe'
  (sft / 'config.json').write_text(json.dumps(saved))
  lm = tmp_path / 'lm'
  lm.mkdir()
  (lm / 'config.json').write_text(json.dumps({'model_name': 'decoder',
                                              'init': {}}))
  for argv, message in (
      ([f'--workdir={workdir}', '--to=dense'], 'export it with --to=llava'),
      ([f'--workdir={sft}', '--to=llava'], "tower_ffn='moe'"),
      ([f'--workdir={lm}', '--to=llava'], 'not a VLM run')):
    status, text, err = run(capsys, 'export', *argv,
                            f'--out={tmp_path / "refused"}')
    assert status == 2 and err.startswith(ERROR), err
    assert message in err, err
  assert 'moe_jax_vlm' in run(capsys, 'export', f'--workdir={sft}',
                              '--to=llava', f'--out={tmp_path / "r"}')[2]
  assert not (tmp_path / 'refused').exists()
  assert not (tmp_path / 'r').exists()
