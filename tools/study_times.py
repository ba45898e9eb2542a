#!/usr/bin/env python
"""How long each stored study took on the machine that ran it (a markdown table; nothing is rerun).

    python tools/study_times.py docs/studies            # every study folder under docs/studies
    python tools/study_times.py docs/studies/prostate   # one study

Machine time is the sum of each run's recorded wall time (fedharmony.study.times explains what it includes).
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "custom"))

from fedharmony.study.times import study_time, times_table  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", type=Path, help="a study folder, or a folder of study folders")
    args = parser.parse_args(argv)
    rows = []

    def warn(line: str) -> None:
        print(f"warning: {line}", file=sys.stderr)

    for folder in args.folders:
        if not folder.is_dir():
            parser.error(f"{folder}: no such folder")
        row = study_time(folder, warn)
        if row is not None:
            rows.append(row)
            continue
        found = [r for r in (study_time(p, warn) for p in sorted(folder.iterdir()) if p.is_dir()) if r is not None]
        if not found:
            parser.error(f"{folder}: holds no study results (results.json or runs/*/seed*/result.json)")
        rows += found
    sys.stdout.write(times_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
