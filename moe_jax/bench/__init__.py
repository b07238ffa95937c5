"""Benchmark scripts: each prints figures (medians), none is a test."""
