#!/usr/bin/env python
"""The README's method guide, from the planned studies' stored results (fedharmony.study.guide).

    python tools/method_guide.py                    # print the table
    python tools/method_guide.py --write README.md  # replace the table between the README's guide markers
    python tools/method_guide.py --check README.md  # exit 1 when the README's table differs from the results'

The rows (situation, task, method, which study's planned comparison) are declared in docs/method_guide.json;
every number is the study's own planned verdict, recomputed from its results.json.
"""

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "custom"))

from fedharmony.study.guide import END, START, GuideError, guide_table, load_guide, replace_table  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--guide", type=Path, default=REPO / "docs" / "method_guide.json", help="the rows to show")
    parser.add_argument("--studies", type=Path, default=REPO / "docs" / "studies", help="the study folders")
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--write", type=Path, metavar="MARKDOWN", help="replace the table between the guide markers")
    action.add_argument("--check", type=Path, metavar="MARKDOWN", help="exit 1 when its table is not the results'")
    args = parser.parse_args(argv)
    try:
        table = guide_table(load_guide(args.guide, args.studies), args.studies)
        target = args.write or args.check
        if target is None:
            sys.stdout.write(table)
            return 0
        try:
            text = target.read_text()
        except OSError as e:
            parser.error(f"{target}: cannot be read ({e})")
        updated = replace_table(text, table, str(target))
    except (GuideError, ValueError) as e:
        print(f"method_guide: {e}", file=sys.stderr)
        return 2
    if args.check:
        if updated != text:
            print(f"{target}: the method guide between {START!r} and {END!r} is not what the stored results give; "
                  f"run: python tools/method_guide.py --write {target}", file=sys.stderr)
            return 1
        print(f"{target}: the method guide matches the stored results")
        return 0
    if updated != text:
        target.write_text(updated)
        print(f"{target}: method guide rewritten")
    else:
        print(f"{target}: method guide already up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
