"""Entry point: python -m moe_jax.main --config=configs/smoe_154m.py --workdir=DIR.

Fields are overridden with --config.<field>=<value> (ml_collections config
flags), e.g. --config.train.steps=1000 --config.moe.backend=blocked. The run
resumes from the newest checkpoint in the workdir.
"""

from __future__ import annotations

import logging as py_logging
import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from moe_jax.validation import ConfigMismatch

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Experiment config file: configs/<router>_<size>.py[:arg].',
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Run directory: config.json, metrics.jsonl, tensorboard/, '
    'checkpoints/. An existing run there is resumed.')
_MODE = flags.DEFINE_enum(
    'mode', 'train', ['train', 'eval', 'trace', 'droptop', 'similarity'],
    'train: train and evaluate (resuming); eval: zero-shot evaluation '
    '(validation PPL and LibMoE\'s tasks, config.eval) of a checkpoint to '
    'DIR/eval/step=<N>.json and .md; trace: record the routing of the '
    "workdir's newest checkpoint over the validation set to DIR/traces/; "
    'droptop: evaluate that checkpoint with each token\'s top-1 (and top-2) '
    'expert removed, to DIR/droptop.json; similarity: expert similarity '
    '(weight ANI, output CKA) of that checkpoint to DIR/similarity.json.')
_TRACE_PROBS = flags.DEFINE_bool(
    'trace_probs', False, "With --mode=trace: also store each router's full "
    'output distribution (T x E values per layer).')
flags.mark_flags_as_required(['config', 'workdir'])


def _unknown_override(argv: list[str]) -> str | None:
  """A message naming the first --config.<path> that the config lacks."""
  from moe_jax import config_lib  # pylint: disable=g-import-not-at-top
  spec = next((a.split('=', 1)[1] for a in argv if a.startswith('--config=')),
              None)
  if spec is None:
    return None
  config = config_lib.load_config(spec)
  for arg in argv:
    if not arg.startswith('--config.'):
      continue
    path = arg[len('--config.'):].split('=', 1)[0].split('.')
    node = config
    for depth, key in enumerate(path):
      if not hasattr(node, 'keys') or key not in node:
        parent = '.'.join(['config'] + path[:depth])
        known = sorted(node.keys()) if hasattr(node, 'keys') else []
        hint = ''
        if path[:depth] == ['loss', 'coefficients']:
          hint = (' A loss is trained by naming it in both moe.losses and '
                  'loss.coefficients, which the router recipe sets; the '
                  'names of moe_jax.moe.losses.LOSSES are the choices.')
        return (f'{arg}: {parent} has no field {key!r}; known names: '
                f'{known}.{hint}')
      node = node[key]
  return None


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a readable error for an unknown override.

  ml_collections raises a bare AttributeError from deep inside its override
  code when `--config.a.b=...` names a field the config lacks.
  """
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as e:
    message = _unknown_override(argv)
    if message is None:
      raise
    del e
    # One line, no traceback: the user mistyped a field name.
    print(f'FATAL flags parsing error: {message}', file=sys.stderr)
    sys.exit(2)


class _QuietLibraries(py_logging.Filter):
  """Drops INFO chatter of orbax and grain (each save logs ~20 lines), and
  JAX's notice that it probed for a TPU on a machine without one."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    if "Unable to initialize backend 'tpu'" in record.getMessage():
      return False
    noisy = ('/orbax/' in record.pathname or '/grain/' in record.pathname)
    return record.levelno >= py_logging.WARNING or not noisy


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  # Imported here so --help is fast and JAX starts after flag parsing.
  try:
    _run_mode(_MODE.value)
  except ConfigMismatch as e:
    # The user's config and the workdir disagree: the message is the answer,
    # a traceback would bury it.
    logging.error('%s', e)
    sys.exit(2)


def _run_mode(mode: str) -> None:
  """Runs --mode on --config and --workdir."""
  # Before JAX starts: its first backend probe logs the TPU notice.
  logging.get_absl_handler().addFilter(_QuietLibraries())
  import jax  # pylint: disable=g-import-not-at-top
  from moe_jax import distributed  # pylint: disable=g-import-not-at-top
  from moe_jax import train  # pylint: disable=g-import-not-at-top
  distributed.initialize_from_environment()
  # Progress lines come from process 0 only; the others log warnings.
  logging.set_verbosity(logging.INFO if jax.process_index() == 0
                        else logging.WARNING)
  if mode == 'eval':
    from eval import zero_shot  # pylint: disable=g-import-not-at-top
    try:
      result = zero_shot.evaluate_checkpoint(_CONFIG.value, _WORKDIR.value)
    except (FileNotFoundError, ValueError) as e:
      # A missing task folder or a bad eval.* field: the message names it.
      logging.error('%s', e)
      sys.exit(2)
    if jax.process_index() == 0:
      paths = zero_shot.write_results(
          os.path.join(_WORKDIR.value, zero_shot.RESULT_DIR), result)
      logging.info('zero-shot evaluation of step %d (%s):\n%s',
                   result['step'], paths[0], zero_shot.markdown(result))
    return
  if mode == 'trace':
    from moe_jax.analysis import tracing  # pylint: disable=g-import-not-at-top
    summary = tracing.trace_checkpoint(_CONFIG.value, _WORKDIR.value,
                                       with_probs=_TRACE_PROBS.value)
    logging.info('traced checkpoint %d: %d token-layer rows in %d layers '
                 'to %s', summary['step'], summary['rows'], summary['layers'],
                 summary['path'])
    return
  if mode == 'droptop':
    from moe_jax.analysis import droptop  # pylint: disable=g-import-not-at-top
    from eval import zero_shot  # pylint: disable=g-import-not-at-top
    config, workdir = _CONFIG.value, _WORKDIR.value
    average = None
    if os.path.isdir(config.eval.data_dir):
      average = lambda model, step: zero_shot.evaluate_checkpoint(
          config, workdir, step=step, model=model, with_ppl=False)['average']
    else:
      logging.warning('DropTop on validation loss only: no zero-shot task '
                      'folder config.eval.data_dir=%r (the change in the '
                      'average zero-shot score needs it)',
                      config.eval.data_dir)
    frame = droptop.evaluate_droptop(config, workdir, zero_shot=average)
    path = droptop.write_droptop(_WORKDIR.value, frame)
    logging.info('DropTop at step %d (%s):\n%s', int(frame['step'].iloc[0]),
                 path, frame.drop(columns='step').to_string(
                     index=False, float_format='%.4f'))
    return
  if mode == 'similarity':
    from moe_jax.analysis import similarity  # pylint: disable=g-import-not-at-top
    frame, cka = similarity.evaluate_similarity(_CONFIG.value, _WORKDIR.value)
    path = similarity.write_similarity(_WORKDIR.value, frame, cka)
    logging.info('expert similarity at step %d (%s):\n%s',
                 int(frame['step'].iloc[0]), path,
                 frame.drop(columns='step').to_string(index=False,
                                                      float_format='%.4f'))
    return
  try:
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except train.TrainingDiverged as e:
    logging.error('%s', e)
    sys.exit(3)


if __name__ == '__main__':
  app.run(main, flags_parser=_parse_flags)
