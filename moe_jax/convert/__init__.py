"""Hugging Face checkpoints in and out: safetensors I/O (safetensors_io.py);
key tables and the import / upcycle / export CLI come next."""
