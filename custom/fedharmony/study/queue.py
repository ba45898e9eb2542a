"""The queue of planned studies: each runs on the commit its plan was written for, in a clone of its own.

A planned study must run on code that measures what its plan was written for (docs/studies.md, "Which code a
queued plan runs on"): plans written before a training default changed run on code from before the change.
``docs/studies/queue.json`` records that as data, in the order the studies should run::

    {"queue": "fedharmony-study-queue/1",
     "studies": [{"study": "prostate_main", "commit": "<40 hex>", "why": "written before ..."}, ...]}

Running the queue (``tools/study_queue.py run``) keeps up to ``parallel`` studies going. Each study gets a
clean clone of this repository at its commit (``<workdir>/<study>``), its own virtual environment
(``make setup`` there), and the runs this checkout already holds for it (its ``plan.lock.json`` and
``runs/*/seed*/result.json``, copied in so that the study tool resumes instead of rerunning them). It then runs
``tools/study.py --plan docs/studies/<study>/plan.json`` there. Whenever a study ends, and on
``tools/study_queue.py collect``, the clone's finished runs are copied back into this checkout's
``docs/studies/<study>/`` (and, for a finished study, its results, report and figures), ready to commit. A run
file already here is never overwritten: one that differs is named and left as it is.

Nothing here knows about NVFlare or MONAI: it clones, copies files and starts the study tool.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

from fedharmony.core.files import read_declaration

__all__ = ["QUEUE_FORMAT", "QueueError", "QueuedStudy", "load_queue", "study_state", "collect", "prepare_clone",
           "run_queue"]

QUEUE_FORMAT = "fedharmony-study-queue/1"
# what a finished study leaves beside its runs (copied back with them)
FINISHED_FILES = ("results.json", "report.md", "results.csv", "outside.csv", "*.png")


class QueueError(ValueError):
    """A queue file, or a study it names, that cannot be run; the message names the entry and the reason."""


@dataclass(frozen=True)
class QueuedStudy:
    study: str
    commit: str
    why: str

    def folder(self, repo: Path) -> Path:
        return repo / "docs" / "studies" / self.study


def _git(repo: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True)


def load_queue(path, repo) -> List[QueuedStudy]:
    """The queue's studies, in order, each checked against the repository: the study has a ``plan.json`` here,
    its commit exists, and the plan at that commit is the same file as here (a plan changed after it was queued
    would be refused by the study's lock anyway; this says so before anything is cloned).

    Raises:
        QueueError: not a queue file, an entry with a missing or unknown field, a study listed twice, a study
            without a plan, an unknown commit, or a plan that differs at the commit.
    """
    path, repo = Path(path), Path(repo)
    try:
        entries = read_declaration(path, "queue", "queue", QUEUE_FORMAT, "studies", ("study", "commit", "why"))
    except ValueError as e:
        raise QueueError(str(e)) from None
    studies, seen = [], set()
    for i, entry in enumerate(entries):
        where = f"queue {path}: studies[{i}]"
        item = QueuedStudy(entry["study"], entry["commit"], entry["why"])
        if item.study in seen:
            raise QueueError(f"{where}: {item.study!r} is queued twice")
        seen.add(item.study)
        plan = item.folder(repo) / "plan.json"
        if not plan.is_file():
            raise QueueError(f"{where}: {item.study!r} has no plan ({plan})")
        if _git(repo, "cat-file", "-e", f"{item.commit}^{{commit}}").returncode != 0:
            raise QueueError(f"{where}: commit {item.commit} of {item.study!r} is not in {repo}")
        rel = plan.relative_to(repo).as_posix()
        at_commit = _git(repo, "rev-parse", f"{item.commit}:{rel}")
        here = _git(repo, "hash-object", str(plan))
        if at_commit.returncode != 0:
            raise QueueError(f"{where}: {rel} does not exist at commit {item.commit[:12]}: the plan must be "
                             f"committed before the code it runs on")
        if at_commit.stdout.strip() != here.stdout.strip():
            raise QueueError(f"{where}: {rel} at commit {item.commit[:12]} differs from this checkout's")
        studies.append(item)
    return studies


def study_state(folder: Path) -> dict:
    """``{"done", "planned", "finished"}`` of a study folder, as :func:`fedharmony.study.times.study_time` reads
    it (planned None when the plan cannot say)."""
    from fedharmony.study.times import study_time

    row = study_time(folder) or {"done": 0, "planned": None, "finished": False}
    return {k: row[k] for k in ("done", "planned", "finished")}


def _copy_new(src: Path, dst: Path, warn: Callable[[str], None]) -> bool:
    """Copy ``src`` to ``dst`` unless ``dst`` exists; a ``dst`` with other bytes is named and kept."""
    if dst.exists():
        if dst.read_bytes() != src.read_bytes():
            warn(f"{dst}: differs from {src}; kept as it is")
        return False
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src, dst)
    return True


def _study_files(folder: Path, finished: bool) -> List[Path]:
    """The files of a study folder that travel: its lock and run results, and a finished study's outputs."""
    files = [folder / "plan.lock.json"] + sorted(folder.glob("runs/*/seed*/result.json"))
    if finished:
        files += [p for pattern in FINISHED_FILES for p in sorted(folder.glob(pattern))]
    return [p for p in files if p.is_file()]


def collect(item: QueuedStudy, clone: Path, repo: Path, warn: Callable[[str], None] = print) -> dict:
    """Copy the clone's finished runs of ``item`` (and, when the study finished there, its results, report and
    figures) into ``repo``'s study folder. Returns ``{"copied": [paths], "finished": bool}``. Files already in
    ``repo`` are not overwritten (a finished study's outputs are: they are rebuilt from the runs)."""
    src, dst = item.folder(clone), item.folder(repo)
    finished = src.is_dir() and study_state(src)["finished"]
    copied = []
    for path in _study_files(src, finished) if src.is_dir() else []:
        target = dst / path.relative_to(src)
        outputs = finished and path.parent == src and path.name != "plan.lock.json"
        if outputs and target.exists() and target.read_bytes() != path.read_bytes():
            shutil.copy2(path, target)  # a finished study's report and results replace an older build of them
            copied.append(target)
        elif _copy_new(path, target, warn):
            copied.append(target)
    return {"copied": copied, "finished": finished}


def prepare_clone(item: QueuedStudy, repo: Path, workdir: Path, log: Callable[[str], None] = print) -> Path:
    """A clone of ``repo`` at the study's commit in ``workdir/<study>`` (made or moved to the commit), with the
    runs ``repo`` holds for the study copied in (never over the clone's own). Returns the clone's path.

    Raises:
        QueueError: the clone cannot be made or checked out (git's message included).
    """
    clone = workdir / item.study
    if not (clone / ".git").exists():
        clone.parent.mkdir(parents=True, exist_ok=True)
        res = subprocess.run(["git", "clone", "-q", "--no-checkout", str(repo), str(clone)], capture_output=True,
                             text=True)
        if res.returncode != 0:
            raise QueueError(f"{item.study}: cannot clone {repo} into {clone}: {res.stderr.strip()}")
        log(f"[queue] {item.study}: cloned into {clone}")
    else:
        _git(clone, "fetch", "-q", str(repo))
    res = _git(clone, "checkout", "-q", "--detach", item.commit)
    if res.returncode != 0:
        raise QueueError(f"{item.study}: cannot check out {item.commit[:12]} in {clone}: {res.stderr.strip()}")
    src = item.folder(repo)
    for path in _study_files(src, finished=False):
        _copy_new(path, item.folder(clone) / path.relative_to(src), log)
    return clone


def _setup(clone: Path, python: Optional[str], log_file) -> Optional[str]:
    """The interpreter for the clone: its own ``.venv`` (``make setup``), or ``python`` when given. None when
    ``make setup`` failed (its output is in the study's log)."""
    if python:
        return python
    res = subprocess.run(["make", "-C", str(clone), "setup"], stdout=log_file, stderr=subprocess.STDOUT)
    return str(clone / ".venv" / "bin" / "python") if res.returncode == 0 else None


def _package_location(interpreter: str, env: dict, clone: Path) -> Optional[str]:
    """None when ``interpreter`` with ``env`` imports the clone's own ``fedharmony``; else where it imports it from
    (or why it cannot)."""
    res = subprocess.run([interpreter, "-c", "import fedharmony, sys; sys.stdout.write(fedharmony.__file__)"],
                         cwd=clone, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        return f"nowhere ({res.stderr.strip().splitlines()[-1] if res.stderr.strip() else 'exit ' + str(res.returncode)})"
    where = Path(res.stdout.strip()).resolve()
    return None if (clone / "custom").resolve() in where.parents else str(where)


def run_queue(studies: List[QueuedStudy], repo, workdir, *, parallel: int = 2, python: Optional[str] = None,
              poll_s: float = 10.0, log: Callable[[str], None] = print) -> Dict[str, int]:
    """Run the unfinished ``studies`` in order, ``parallel`` at a time, each in its clone (:func:`prepare_clone`),
    collecting each study's runs back into ``repo`` when it ends. ``python``: an interpreter to use instead of
    each clone's own ``.venv`` (its packages must be what the commit's ``requirements.txt`` pins; the clone's
    ``custom/`` is put first on ``PYTHONPATH`` so that the clone's code runs). Returns study -> exit status of
    the studies it ran. On Ctrl-C every running study is stopped (its finished runs stay cached and are
    collected) and KeyboardInterrupt is raised again."""
    if parallel < 1:
        raise ValueError(f"parallel must be at least 1, got {parallel}")
    repo, workdir = Path(repo).resolve(), Path(workdir).resolve()
    todo = []
    for item in studies:
        state = study_state(item.folder(repo))
        if state["finished"]:
            log(f"[queue] {item.study}: finished here ({state['done']} runs); skipped")
        else:
            todo.append(item)
    running: Dict[str, tuple] = {}
    status: Dict[str, int] = {}

    def start(item: QueuedStudy) -> None:
        try:
            clone = prepare_clone(item, repo, workdir, log)
        except QueueError as e:  # named; the other studies go on
            status[item.study] = 1
            log(f"[queue] {e}; not started")
            return
        log_path = workdir / f"{item.study}.log"
        log_file = open(log_path, "a")
        interpreter = _setup(clone, python, log_file)
        if interpreter is None:
            log_file.close()
            status[item.study] = 1
            log(f"[queue] {item.study}: make setup failed in {clone} (see {log_path}); not started")
            return
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(clone / "custom")] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))}
        imported = _package_location(interpreter, env, clone)
        if imported is not None:  # another checkout's package would run: the study would not be its commit's
            log_file.close()
            status[item.study] = 1
            log(f"[queue] {item.study}: {interpreter} imports fedharmony from {imported}, not from {clone}; "
                f"not started")
            return
        cmd = [interpreter, "tools/study.py", "--plan", f"docs/studies/{item.study}/plan.json"]
        proc = subprocess.Popen(cmd, cwd=clone, stdout=log_file, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        running[item.study] = (item, proc, clone, log_file)
        log(f"[queue] {item.study}: started at {item.commit[:12]} in {clone} (pid {proc.pid}, log {log_path})")

    def finish(name: str, rc: int) -> None:
        item, _, clone, log_file = running.pop(name)
        log_file.close()
        status[name] = rc
        got = collect(item, clone, repo, log)
        state = "finished" if got["finished"] else f"stopped with exit status {rc}"
        log(f"[queue] {name}: {state}; {len(got['copied'])} file(s) copied into {item.folder(repo)}")

    try:
        while todo or running:
            while todo and len(running) < parallel:
                start(todo.pop(0))
            for name, (_, proc, _, _) in list(running.items()):
                if proc.poll() is not None:
                    finish(name, proc.returncode)
            if running:
                time.sleep(poll_s)
    except KeyboardInterrupt:
        for name, (_, proc, _, _) in list(running.items()):
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            proc.wait()
            finish(name, proc.returncode)
        raise
    return status
