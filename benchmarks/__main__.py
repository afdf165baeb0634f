"""Runs every kernel benchmark at its default sizes (or all with --quick):

    python -m benchmarks                         # sparse_crf, box_priors, affinity, background_attention,
                                                 # dense_crf, crf_inference, uncertainty
    python -m benchmarks --quick                 # the smoke runs
    python -m benchmarks --write-results         # the same, then writes benchmarks/RESULTS.md from the numbers
                                                 # measured in this run (atomically)

Every other option goes to the benchmarks that take it (``python -m benchmarks.<name> --help`` lists them),
e.g. ``--device cuda`` to all and ``--no-accuracy`` to dense_crf only; an option no benchmark takes is an error.
"""

from __future__ import annotations

import sys

from benchmarks import (
    affinity,
    background_attention,
    box_priors,
    cli,
    crf_inference,
    dense_crf,
    sparse_crf,
    uncertainty,
)

BENCHMARKS = (sparse_crf, box_priors, affinity, background_attention, dense_crf, crf_inference, uncertainty)
WRITE_FLAG = "--write-results"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    write = WRITE_FLAG in argv
    passed = [a for a in argv if a != WRITE_FLAG]
    unknown = set.intersection(*(cli.unknown_options(module.BENCHMARK, passed) for module in BENCHMARKS))
    if unknown:
        print(f"python -m benchmarks: no benchmark takes {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    reports = []
    for module in BENCHMARKS:
        print(f"==================== benchmarks.{module.BENCHMARK.name} ====================", flush=True)
        report = cli.run(module.BENCHMARK, passed, known_only=True)
        if report is not None:
            reports.append(report)
    if write:
        if not reports:
            print("no benchmark ran on this device; benchmarks/RESULTS.md is left as it was")
            return 1
        print(f"wrote {cli.write_results(reports, passed)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
