"""What a study run was made on: the package's code, the commit, the CPU and the library versions.

The study's cache is keyed by the run's settings and the bundle's configs, not by the package's
code: a docstring edit must not throw away hours of runs. So a cached run can be older than the
code beside it, and two arms of one study can come from different code. Each run records
:func:`made_on`; the study names a cached run made on other code when it reuses it, and the
report lists, per arm, what its runs were made on and warns where they differ.

Floating-point results also depend on the CPU: torch picks its kernels by the instruction set
(``torch.backends.cpu.get_cpu_capability()``), and a different summation order changes the last
bits, which a training run can grow into a different model. A run is bit-reproducible on the same
code, versions and kind of CPU only.

Example::

    >>> info = made_on()
    >>> sorted(info)
    ['code', 'commit', 'cpu', 'dirty', 'versions']
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import platform
import subprocess
from pathlib import Path
from typing import Dict, Iterable, List, Optional

__all__ = ["CODE_DIRS", "TRAINING_DEFAULTS", "code_digest", "git_state", "cpu_description", "made_on", "code_line",
           "describe", "run_line", "differing", "bundle_record", "bundle_line"]

REPO = Path(__file__).resolve().parents[3]
# what a run executes besides the bundle (whose configs the settings key already holds)
CODE_DIRS = ("custom/fedharmony", "jobs")


def code_digest(root: Path = REPO, dirs: Iterable[str] = CODE_DIRS) -> str:
    """sha256 (first 12 hex digits) of every ``.py`` file under ``dirs``: relative path and bytes, in path order."""
    h = hashlib.sha256()
    for d in dirs:
        for path in sorted((Path(root) / d).rglob("*.py")):
            h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:12]


def git_state(root: Path = REPO, dirs: Iterable[str] = CODE_DIRS) -> tuple:
    """``(commit, dirty)`` of the checkout at ``root``: the HEAD commit (12 hex digits) and whether ``dirs``
    differ from it; ``(None, None)`` where there is no git checkout or no git."""
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                                text=True, timeout=30, check=True).stdout.strip()
        changes = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", *dirs], capture_output=True,
                                 text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None, None
    return commit or None, bool(changes.strip())


def cpu_description() -> str:
    """The CPU's model name and the instruction set torch's kernels use, e.g. ``AMD EPYC, torch kernels AVX2``."""
    import torch

    name = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    kernels = torch.backends.cpu.get_cpu_capability()
    return f"{name or platform.processor() or platform.machine()}, torch kernels {kernels}"


def made_on(root: Path = REPO) -> Dict[str, object]:
    """What a run made now is made on: ``code`` (:func:`code_digest`), ``commit`` and ``dirty``
    (:func:`git_state`), ``cpu`` (:func:`cpu_description`) and the versions of torch, monai, numpy, nvflare."""
    commit, dirty = git_state(root)
    return {"code": code_digest(root), "commit": commit, "dirty": dirty, "cpu": cpu_description(),
            "versions": {name: _version(name) for name in ("torch", "monai", "numpy", "nvflare")}}


def _version(package: str) -> Optional[str]:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def code_line(info: dict) -> str:
    """The code part of ``made_on``, e.g. ``3f2a9c1d0b7e (commit 0515875a1b2c, changed)``."""
    commit = info.get("commit")
    where = f"commit {commit}{', changed' if info.get('dirty') else ''}" if commit else "no git checkout"
    return f"{info.get('code', '?')} ({where})"


def describe(info) -> str:
    """One line for a run's ``made_on``, e.g.
    ``code 3f2a9c1d0b7e (commit 0515875a1b2c, changed), AMD EPYC, torch kernels AVX2``; a run without one says
    ``not recorded``, one whose record is not an object says so."""
    if not info:
        return "not recorded"
    if not isinstance(info, dict):
        return f"unreadable record ({type(info).__name__})"
    recorded = f" (recorded {info['recorded']})" if info.get("recorded") else ""  # e.g. once per study, not per run
    return f"code {code_line(info)}, {info.get('cpu', '?')}{recorded}"


def run_line(run: dict) -> str:
    """:func:`describe` of a study result entry's ``made_on`` (the versions left out: ``requirements.txt`` pins
    them, and the study's ``results.json`` names them)."""
    return describe(run.get("made_on"))


def differing(runs: Iterable[dict]) -> List[str]:
    """The :func:`run_line` of each of ``runs`` (study result entries), each once, in first-seen order; more than
    one means the runs were not all made on the same code and CPU."""
    return list(dict.fromkeys(run_line(run) for run in runs))


# bundle training settings whose default changed between versions: a report says which default its runs had
TRAINING_DEFAULTS = ("spatial_augmentation",)


def bundle_record(bundle_dir) -> Dict[str, object]:
    """The bundle a study trains: its name, version and the defaults of :data:`TRAINING_DEFAULTS` it has, for
    ``results.json``."""
    import json

    bundle_dir = Path(bundle_dir)
    metadata = json.loads((bundle_dir / "configs" / "metadata.json").read_text())
    train = json.loads((bundle_dir / "configs" / "train.json").read_text())
    return {"name": bundle_dir.name, "version": metadata.get("version"),
            "training_defaults": {key: train[key] for key in TRAINING_DEFAULTS if key in train}}


def bundle_line(record: Optional[dict]) -> Optional[str]:
    """The report's line for :func:`bundle_record` (None for results that predate it)."""
    if not isinstance(record, dict):
        return None
    defaults = ", ".join(f"{k} {v}" for k, v in (record.get("training_defaults") or {}).items())
    return (f"- bundle: {record.get('name')} {record.get('version')}"
            + (f"; training defaults: {defaults} (an arm's own settings replace them)" if defaults else ""))
