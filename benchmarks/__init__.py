"""Kernel benchmarks for boxloss (not part of the test suite).

Run from the repository root, e.g. ``python -m benchmarks.sparse_crf``, or all of them with
``python -m benchmarks``.  Each writes its raw numbers under ``benchmarks/results/`` (git-ignored);
``python -m benchmarks --write-results`` also writes the tables of that run to ``benchmarks/RESULTS.md``.
The shared command line is :mod:`benchmarks.cli`, the shared measuring tools :mod:`benchmarks.common`.
"""
