"""Runs every kernel benchmark at its default sizes (or all with --quick):

    python -m benchmarks            # sparse_crf, box_priors, affinity, background_attention, dense_crf,
                                    # crf_inference, uncertainty
    python -m benchmarks --quick    # the smoke runs
"""

from __future__ import annotations

import sys

from benchmarks import affinity, background_attention, box_priors, crf_inference, dense_crf, sparse_crf, uncertainty

BENCHMARKS = (("sparse_crf", sparse_crf), ("box_priors", box_priors), ("affinity", affinity),
              ("background_attention", background_attention), ("dense_crf", dense_crf),
              ("crf_inference", crf_inference), ("uncertainty", uncertainty))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    status = 0
    for name, module in BENCHMARKS:
        print(f"==================== benchmarks.{name} ====================", flush=True)
        status |= module.main(argv)
    return status


if __name__ == "__main__":
    sys.exit(main())
