"""The tiny shapes multiple-choice task for lmms-eval (vlm_shapes.yaml)."""
