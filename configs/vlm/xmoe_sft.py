r"""XMoE (low-rank hypersphere cosine router) in LibMoE's vision-language recipe (algorithms.md §10.2).

Stage 3, visual instruction tuning (SFT): every vision-tower MLP and the
projector become MoE layers upcycled from the PFT weights (E 6, k 3; the
LLM stays dense), trained with the balance loss (top-1, 0.01) and router
z-loss (0.001), averaged over the tower's layers plus the projector's.
configs/vlm/xmoe_pt.py and xmoe_pft.py are the two dense stages before it.

Commands (LLaVA data under data/llava/; Phi-3.5-mini and
SigLIP-so400m-patch14-224 Hugging Face directories):
  python -m moe_jax.main --config=configs/vlm/xmoe_pt.py --workdir=/tmp/vlm_xmoe/pt --config.init.llm_hf_path=PHI35_DIR --config.init.vision_hf_path=SIGLIP_DIR
  python -m moe_jax.main --config=configs/vlm/xmoe_pft.py --workdir=/tmp/vlm_xmoe/pft --config.init.previous_stage=/tmp/vlm_xmoe/pt
  python -m moe_jax.main --config=configs/vlm/xmoe_sft.py --workdir=/tmp/vlm_xmoe/sft --config.init.previous_stage=/tmp/vlm_xmoe/pft
CPU quickstart, the three tiny stages (tiny random HF Phi-3 + SigLIP and
the built-in shapes set, written into the workdir; the SFT stage also runs
alone, from the tiny HF models):
  make vlm-tiny VLM_ROUTER=xmoe

Hardware: LibMoE used 4 x 80 GB GPUs (ZeRO-2/3); here the mesh data axis
  takes every device (add --config.train.grad_accum to fit).
Runtime: not measured on a GPU.
Expected: LibMoE v2 (Phi-3.5-mini + SigLIP-224, LLaVA-665K SFT): average of
  12 benchmarks 50.87 (algorithms.md §8.2).

Arguments (`:key=value,...`): tiny.
"""

from moe_jax import vlm_experiment


def get_config(arg=None):
  return vlm_experiment.experiment('xmoe', 'sft', arg)
