"""Time and memory of an NVFlare simulator run, read from its logs and the process table (no NVFlare import).

Used by the scaling study (:mod:`fedharmony.study.scaling`), the federation benchmark and the GPU check:

* :func:`aggregation_times`: when the server aggregated each round (the aggregator's log line);
* :func:`round_times`: seconds between consecutive aggregations, per round;
* :func:`site_task_times`: per round, the slowest site's whole train task (validation, training,
  checkpointing), from the sites' round lines;
* :func:`peak_rss`: peak resident memory of the simulator's server and site processes, sampled
  with ``ps`` every half second while a block runs, counting only this process's descendants
  (:func:`rss_sampler` does the sampling).
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import threading
from datetime import datetime
from pathlib import Path
from typing import Dict, Optional

__all__ = ["aggregation_times", "round_times", "site_task_times", "rss_sampler", "peak_rss"]

_AGGREGATED = re.compile(r"^(\S+ \S+) .*round (\d+): aggregated")  # SiteUpdateAggregator's line
_SITE_TASK = re.compile(r"round (\d+): (?:global|personalized) \S+ \S+,.*? \d+ local steps, task ([\d.]+) s")


def aggregation_times(server_log: Path) -> Dict[int, float]:
    """{round: UNIX time of its aggregation} from a server log."""
    stamps = {}
    for line in Path(server_log).read_text().splitlines():
        m = _AGGREGATED.search(line)
        if m:
            stamps[int(m.group(2))] = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
    return stamps


def round_times(server_log: Path) -> Dict[int, float]:
    """Seconds between consecutive aggregations: {round: duration} for rounds 1 .. N - 1."""
    stamps = aggregation_times(server_log)
    return {r: stamps[r] - stamps[r - 1] for r in sorted(stamps) if r - 1 in stamps}


def site_task_times(workspace: Path) -> Dict[int, float]:
    """Per round: the slowest site's whole train task (validation, training, checkpointing) in seconds, from
    ``<workspace>/site-*/log.txt``."""
    per_round: Dict[int, float] = {}
    for log in Path(workspace).glob("site-*/log.txt"):
        for m in _SITE_TASK.finditer(log.read_text()):
            r, t = int(m.group(1)), float(m.group(2))
            per_round[r] = max(per_round.get(r, 0.0), t)
    return per_round


def _process_tree(table: Dict[int, tuple], root: int) -> set:
    """The pids of ``root`` and all its descendants, from ``{pid: (ppid, ...)}``."""
    children: Dict[int, list] = {}
    for pid, (ppid, *_rest) in table.items():
        children.setdefault(ppid, []).append(pid)
    tree, todo = set(), [root]
    while todo:
        pid = todo.pop()
        if pid not in tree:
            tree.add(pid)
            todo.extend(children.get(pid, ()))
    return tree


def rss_sampler(stop: threading.Event, peaks: dict, root: Optional[int] = None):
    """Until ``stop`` is set, record in ``peaks`` the largest RSS (MiB) seen of a simulator server process
    (``peaks["server"]``) and of a site process (``peaks["client"]``), every 0.5 s. Run it in a thread.

    Only ``root`` (default: this process) and its descendants count: a simulator that another program runs on
    the same machine (a background study, a parallel test) must not enter this run's figures."""
    root = os.getpid() if root is None else root
    while not stop.is_set():
        # -ww: whole command lines (ps cuts them to $COLUMNS otherwise, and the process's name can fall off)
        out = subprocess.run(["ps", "-eww", "-o", "pid=,ppid=,rss=,args="], capture_output=True, text=True).stdout
        table = {}
        for line in out.splitlines():
            fields = line.split(None, 3)
            if len(fields) == 4 and fields[0].isdigit() and fields[1].isdigit() and fields[2].isdigit():
                table[int(fields[0])] = (int(fields[1]), int(fields[2]), fields[3])
        for pid in _process_tree(table, root):
            if pid not in table:
                continue
            _, rss, args = table[pid]
            if "simulator_worker" in args or "client_train" in args:
                peaks["client"] = max(peaks.get("client", 0), rss / 1024)
            elif "nvflare.private.fed.app.simulator.simulator" in args or "nvflare simulator" in args:
                peaks["server"] = max(peaks.get("server", 0), rss / 1024)
        stop.wait(0.5)


SAMPLER_THREAD_NAME = "fedharmony-peak-rss"


@contextlib.contextmanager
def peak_rss():
    """``with peak_rss() as peaks: <run the simulator>``: afterwards ``peaks`` holds the largest RSS (MiB) of a
    server process (``"server"``) and of a site process (``"client"``) seen while the block ran; empty on a
    machine without ``ps`` (the run goes on). The sampling thread stops when the block ends, also on an error."""
    peaks: dict = {}
    stop = threading.Event()

    def sample():
        with contextlib.suppress(OSError):
            rss_sampler(stop, peaks)

    thread = threading.Thread(target=sample, name=SAMPLER_THREAD_NAME, daemon=True)
    thread.start()
    try:
        yield peaks
    finally:
        stop.set()
        thread.join()
