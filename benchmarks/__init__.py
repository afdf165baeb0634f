"""Kernel benchmarks for boxloss (not part of the test suite).

Run from the repository root, e.g. ``python -m benchmarks.sparse_crf``.
Results are written under ``benchmarks/results/`` (git-ignored).
"""
