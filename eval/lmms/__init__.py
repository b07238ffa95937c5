"""lmms-eval (0.7.x) integration of moe_jax's vision-language models.

  plugin.py   the `lmms` model 'moe_jax_vlm' (a VLM workdir's checkpoint,
              scored by eval/vlm_scorer.py)

lmms-eval 0.7 finds out-of-tree models through the entry-point group
`lmms_eval.models` (setup.cfg: `moe_jax_vlm = eval.lmms:manifests`). Every
`import lmms_eval.models` loads that entry point, so this module stays
light: it names the class by path and imports neither JAX nor torch; the
class is imported only when the model is asked for.
"""

from __future__ import annotations

MODEL_NAME = 'moe_jax_vlm'
CLASS_PATH = 'eval.lmms.plugin.MoEJaxVLM'


def manifests():
  """The entry point's payload: lmms-eval's ModelManifest of the plugin."""
  # pylint: disable=g-import-not-at-top
  from lmms_eval.models.registry_v2 import ModelManifest
  return [ModelManifest(model_id=MODEL_NAME, simple_class_path=CLASS_PATH)]
