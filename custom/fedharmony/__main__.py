"""``fedharmony`` (or ``python -m fedharmony``): one command in front of the job scripts and the tools.

    fedharmony methods                                   the methods, what each site ends with, settings
    fedharmony job prostate --algorithm fedbn --data-root data/prostate --sites 6 --rounds 10
    fedharmony job dermoscopy --algorithm ditto ... --export --export-dir build/jobs
    fedharmony study --task prostate --methods fedavg fedbn --seeds 5 --out DIR
    fedharmony demo | poc | site-policy | prepare-prostate-data | make-phantom-sites | ...

``job`` runs the same command line as ``jobs/<task>.py`` (any of its flags). Every other command
runs ``tools/<command>.py`` of the checkout the package is installed from (``pip install -e .``),
with the arguments unchanged; the tools keep working on their own.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[2]
TASKS = {  # task -> (bundle folder, the job script's default overrides)
    "prostate": ("prostate_mri_seg", None),
    "dermoscopy": ("image_classification", {"task": "dermoscopy"}),
    "histology": ("image_classification", {"task": "histology"}),
}


def _tools():
    folder = CHECKOUT / "tools"
    return {p.stem.replace("_", "-"): p for p in sorted(folder.glob("*.py"))
            if not p.stem.startswith(("_", "bench_common"))} if folder.is_dir() else {}


def _usage() -> str:
    tools = ", ".join(_tools()) or "(none: this installation has no tools/ folder beside it)"
    return (f"usage: fedharmony methods | job {{{','.join(TASKS)}}} [job flags] | <tool> [args]\n"
            f"tools: {tools}\n")


def list_methods() -> int:
    from fedharmony.methods import method_table

    print(method_table())
    return 0


def run_job(argv) -> int:
    if not argv or argv[0] not in TASKS:
        sys.stderr.write(f"fedharmony job: name a task first, one of {sorted(TASKS)}\n")
        return 2
    # the job script's own file when there is one: a quiet run restarts it as the simulator's process
    script = CHECKOUT / "jobs" / f"{argv[0]}.py"
    sys.argv = [str(script) if script.is_file() else "fedharmony", *argv[1:]]
    # imported only now: NVFlare takes its --export / --export-dir out of sys.argv when it is imported
    from fedharmony.fl.cli import main as job_main
    from fedharmony.bundle.job_policy import site_bundle_root

    bundle, defaults = TASKS[argv[0]]
    return job_main(str(site_bundle_root() / bundle), default_overrides=defaults)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        sys.stdout.write(__doc__ + "\n" + _usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "methods":
        return list_methods()
    if command == "job":
        return run_job(rest)
    tool = _tools().get(command)
    if tool is None:
        sys.stderr.write(f"fedharmony: unknown command {command!r}\n" + _usage())
        return 2
    sys.argv = [str(tool), *rest]
    sys.path.insert(0, str(tool.parent))  # as when the tool runs directly (its helpers sit beside it)
    try:
        runpy.run_path(str(tool), run_name="__main__")
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
