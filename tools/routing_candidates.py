#!/usr/bin/env python
"""Which unsupervised method should routed inference default to? The selection table over stored outside studies.

    python tools/routing_candidates.py docs/studies/iopfl_unseen docs/studies/iopfl_unseen_2 \\
        docs/studies/iopfl_unseen_3 docs/studies/iopfl_unseen_4 docs/studies/iopfl_loso

Per candidate (routing, and the routing safeguard with its loss, consensus and departure criteria), over every
target of the given studies: the mean difference from the global model, the targets more than one Dice point
below it (mean over seeds) and the worst target; the rule picks the fewest such targets, then the higher worst
target (fedharmony.study.outside_report.candidate_rows). The studies that choose a default this way must never be
the ones that judge it: the planned study docs/studies/routing_default/ judges it on fresh scanners.
"""

import argparse
import sys


def main(argv=None) -> int:
    from fedharmony.study.outside import load_outside_results
    from fedharmony.study.outside_report import candidate_rows

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("studies", nargs="+", metavar="DIR", help="outside study folders (results.json)")
    args = p.parse_args(argv)
    try:
        studies = {d.rstrip("/").split("/")[-1]: load_outside_results(d) for d in args.studies}
    except (FileNotFoundError, ValueError) as e:
        p.error(str(e))
    rows, chosen = candidate_rows(studies)
    print("\n".join(rows) + f"\n\nchosen: {chosen}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
