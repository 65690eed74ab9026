"""deltaclip's benchmarks: one harness (bench/harness.py) and one module per question.

Run from the repository root as ``python -m bench <question> [options]``; ``python -m bench
--help`` lists the questions and ``python -m bench <question> --help`` their options. Every
question writes one JSON result (schema in :mod:`bench.harness`); docs/BENCHMARKS.md gives the
command behind each published figure.
"""
