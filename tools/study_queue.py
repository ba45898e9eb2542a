#!/usr/bin/env python
"""Run the planned studies that have not finished, each on the commit its plan was written for.

    python tools/study_queue.py list                                   # each queued study: commit, runs done
    python tools/study_queue.py run --workdir ../study_queue            # 2 at a time, in clones under workdir
    python tools/study_queue.py run --workdir ../study_queue --only prostate_main --parallel 1
    python tools/study_queue.py collect --workdir ../study_queue        # copy the clones' finished runs back

The queue is docs/studies/queue.json (fedharmony.study.queue explains it). Each study runs in a clean clone
of this repository at its commit, with its own .venv (make setup) and the runs this checkout holds for it, so
it resumes; its finished runs come back into docs/studies/<study>/ here, ready to commit. Stopping (Ctrl-C)
loses at most the runs under way.
"""

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "custom"))

from fedharmony.study.queue import QueueError, collect, load_queue, run_queue, study_state  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["list", "run", "collect"])
    parser.add_argument("--queue", type=Path, default=REPO / "docs" / "studies" / "queue.json")
    parser.add_argument("--repo", type=Path, default=REPO, help="the checkout whose docs/studies receive the runs")
    parser.add_argument("--workdir", type=Path, help="where the clones live (run, collect)")
    parser.add_argument("--only", nargs="+", metavar="STUDY", help="these queued studies only, in the queue's order")
    parser.add_argument("--parallel", type=int, default=2, help="studies at a time (run; default 2)")
    parser.add_argument("--python", help="an interpreter to use instead of each clone's own .venv (its packages "
                                         "must be what the commit's requirements.txt pins)")
    parser.add_argument("--poll", type=float, default=10.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.action != "list" and args.workdir is None:
        parser.error(f"{args.action} needs --workdir (where each study's clone lives)")
    if args.parallel < 1:
        parser.error(f"--parallel must be at least 1, got {args.parallel}")
    repo = args.repo.resolve()
    try:
        studies = load_queue(args.queue, repo)
    except QueueError as e:
        print(f"study_queue: {e}", file=sys.stderr)
        return 2
    if args.only:
        unknown = sorted(set(args.only) - {s.study for s in studies})
        if unknown:
            parser.error(f"--only: {unknown} not in the queue {args.queue} ({[s.study for s in studies]})")
        studies = [s for s in studies if s.study in args.only]
    if args.action == "list":
        print("| study | commit | runs done | state | why this commit |\n|---|---|---|---|---|")
        for s in studies:
            st = study_state(s.folder(repo))
            done = f"{st['done']} of {st['planned']}" if st["planned"] is not None else str(st["done"])
            state = "finished" if st["finished"] else "started" if st["done"] else "queued"
            print(f"| {s.study} | {s.commit[:12]} | {done} | {state} | {s.why} |")
        return 0
    if args.action == "collect":
        for s in studies:
            clone = args.workdir.resolve() / s.study
            if clone.is_dir():
                got = collect(s, clone, repo, lambda line: print(f"warning: {line}", file=sys.stderr))
                print(f"{s.study}: {len(got['copied'])} file(s) copied" + (" (finished)" if got["finished"] else ""))
        return 0
    try:
        status = run_queue(studies, repo, args.workdir, parallel=args.parallel, python=args.python,
                           poll_s=args.poll)
    except QueueError as e:
        print(f"study_queue: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("study_queue: stopped; the finished runs are collected, the rest resume on the next run",
              file=sys.stderr)
        return 130
    failed = {k: v for k, v in status.items() if v != 0}
    if failed:
        print(f"study_queue: ended with failures {failed}; see each study's log in {args.workdir}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
