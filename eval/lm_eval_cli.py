"""lm-eval's command line with the 'moe_jax' model registered.

lm-eval 0.4.13 has no --include_package, so an out-of-tree model must be
imported before lm-eval parses its arguments. This module imports the
adapter (eval/lm_eval_adapter.py) and hands the command line to lm-eval's
own entry point, lm_eval.__main__.cli_evaluate (the `lm-eval` / `lm_eval`
console script); every lm-eval argument works as documented there:

  python -m eval.lm_eval_cli --model moe_jax \
      --model_args workdir=W,step=200 --batch_size 32 \
      --include_path eval/lm_eval_tasks --tasks piqa_local,arc_local,blimp_local \
      --limit 100 --output_path out/ --log_samples
  python -m eval.lm_eval_cli ls tasks --include_path eval/lm_eval_tasks

Offline by default: HF_HUB_OFFLINE and HF_DATASETS_OFFLINE are set to 1
unless already set (the local tasks read files; export them as 0 to let
lm-eval download hub tasks). The local tasks find their data through
MOE_JAX_LM_EVAL_DATA (default <repo>/../shared/data/lm_eval).

Notes: model_args batch_size wins over --batch_size (whose default is 1);
--batch_size auto means the adapter's default, 32. For perplexity metrics
(lambada_local) lm-eval bootstraps the stderr in a forked process pool;
export DISABLE_MULTIPROC=1 to keep it in this (multithreaded JAX) process.
"""

from __future__ import annotations

import os

for _name in ('HF_HUB_OFFLINE', 'HF_DATASETS_OFFLINE'):
  os.environ.setdefault(_name, '1')

# pylint: disable=g-import-not-at-top,wrong-import-position
from lm_eval.__main__ import cli_evaluate

from eval import lm_eval_adapter  # noqa: F401  (registers 'moe_jax')


def main() -> None:
  cli_evaluate()


if __name__ == '__main__':
  main()
