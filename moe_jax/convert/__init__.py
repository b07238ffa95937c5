"""Hugging Face checkpoints in and out: safetensors I/O (safetensors_io.py),
key tables (families.py, moe_families.py), import, upcycling, export, tiny
random models (tiny.py) and their command line, `python -m moe_jax.convert`
(__main__.py)."""
