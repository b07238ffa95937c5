"""Evaluation: zero-shot LM benchmarks, scoring and router analysis."""
