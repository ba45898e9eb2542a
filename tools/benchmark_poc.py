#!/usr/bin/env python
"""Benchmark the real federation (NVFlare POC) against the simulator on the phantom sites.

    python tools/benchmark_poc.py [--sites 6] [--rounds 3] [--memory-rounds 20] [--cases 10]
                                  [--memory-gc-rounds N] [--memory-only]

1. POC stand-up (``tools/poc.py up``: prepare + start) and tear-down (``down --clean``);
2. one FedAvg job of ``--rounds`` rounds through the FLARE API (submission to FINISHED),
   and the same job in the simulator (``jobs/prostate.py``, wall time with start-up);
3. server memory over a ``--memory-rounds`` FedAvg job on POC: the server process's RSS
   (``/proc/<pid>/status``) sampled every second, read at each round's aggregation
   (``--memory-gc-rounds N``: with NVFlare's server gc + malloc_trim every N rounds;
   ``--memory-only``: skip 1-2).
Prints Markdown tables (machine, versions and command first).
"""

import argparse
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

import poc  # noqa: E402  (tools/poc.py)
from bench_common import ensure_phantom_sites, header  # noqa: E402
from fedharmony.study.simulator_timing import aggregation_times  # noqa: E402



def server_processes(root: Path) -> dict:
    """{pid: "parent" | "job"}: the POC server (``server_train``) and the per-job process it spawns."""
    found = {}
    server_kit = str(root / "poc" / "example_project" / "prod_00" / "server")
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if server_kit in cmd and "python" in cmd:
                found[int(d.name)] = "parent" if "server_train" in cmd else "job"
    return found


def sample_rss(root: Path, stop: threading.Event, samples: list):
    """Every second: (time, {"parent": MiB, "job": MiB}) of the server's processes."""
    while not stop.is_set():
        rss = {}
        for pid, kind in server_processes(root).items():
            try:
                for line in open(f"/proc/{pid}/status"):
                    if line.startswith("VmRSS"):
                        rss[kind] = rss.get(kind, 0.0) + int(line.split()[1]) / 1024
            except OSError:
                pass
        samples.append((time.time(), rss))
        stop.wait(1.0)


def export(name: str, rounds: int, sites: int, out: Path, *flags: str) -> Path:
    subprocess.run([sys.executable, str(REPO / "jobs" / "prostate.py"), "--algorithm", "fedavg", "--rounds", str(rounds),
                    "--sites", str(sites), "--name", name, *flags, "--export", "--export-dir", str(out)],
                   check=True, capture_output=True)
    return out / name


def rss_by_round(log: Path, samples: list) -> dict:
    """{round: {"parent": MiB, "job": MiB}} at each aggregation, from the server log's timestamps."""
    out = {}
    for r, t in aggregation_times(log).items():
        before = [rss for ts, rss in samples if ts <= t and "job" in rss]
        if before:
            out[r] = before[-1]
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sites", type=int, default=6)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--memory-rounds", type=int, default=20)
    p.add_argument("--cases", type=int, default=10)
    p.add_argument("--memory-gc-rounds", type=int, default=0, help="server gc + malloc_trim every N rounds")
    p.add_argument("--memory-only", action="store_true", help="only the server-memory job")
    p.add_argument("--out", default=str(REPO / "workspace" / "bench_poc"))
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    data = out / "data"
    ensure_phantom_sites(data, args.cases)
    print("\n".join(header("benchmark_poc.py", argv)) + "\n")
    root = out / "federation"
    jobs = out / "jobs"
    short = export("fedavg_short", args.rounds, args.sites, jobs)
    long = export("fedavg_memory", args.memory_rounds, args.sites, jobs,
                  "--memory-gc-rounds", str(args.memory_gc_rounds))

    up = poc.up(root, args.sites, str(data))
    try:
        r = None if args.memory_only else poc.submit(root, str(short), timeout=3600, out=str(out / "results"))
        samples, stop = [], threading.Event()
        sampler = threading.Thread(target=sample_rss, args=(root, stop, samples), daemon=True)
        sampler.start()
        m = poc.submit(root, str(long), timeout=7200, out=str(out / "results"))
        stop.set()
        sampler.join()
    finally:
        down = poc.down(root, clean=True)
    if not args.memory_only:
        t0 = time.time()
        subprocess.run([sys.executable, str(REPO / "jobs" / "prostate.py"), "--algorithm", "fedavg", "--rounds",
                        str(args.rounds), "--sites", str(args.sites), "--data-root", str(data), "--workspace",
                        str(out / "sim"), "--name", "fedavg_short"], check=True, capture_output=True)
        sim = time.time() - t0

        print("| step | seconds |\n|---|---|")
        print(f"| POC up: prepare ({args.sites} sites) | {up['prepare_s']:.1f} |")
        print(f"| POC up: start server + sites | {up['start_s']:.1f} |")
        print(f"| POC down (stop + clean) | {down['stop_s']:.1f} |")
        print(f"| FedAvg {args.sites} sites x {args.rounds} rounds, FLARE API submit to finished | {r['seconds']:.1f} |")
        print(f"| same job in the simulator (jobs/prostate.py, wall with start-up) | {sim:.1f} |")
    per_round = rss_by_round(Path(m["result"]) / "workspace" / "log.txt", samples)
    gc_note = f", memory_gc_rounds={args.memory_gc_rounds}" if args.memory_gc_rounds else ""
    print(f"\nserver RSS (MiB) at each aggregation, FedAvg {args.sites} sites x {args.memory_rounds} rounds{gc_note} "
          f"(job {m['status']}, {m['seconds']:.0f} s):\n")
    rounds = sorted(per_round)
    print("| round | server parent MiB | server job process MiB |\n|---|---|---|")
    for k in rounds:
        print(f"| {k} | {per_round[k].get('parent', 0):.0f} | {per_round[k]['job']:.0f} |")
    if len(rounds) > 2:
        first, last = rounds[1], rounds[-1]  # round 0 includes the first-round allocations
        for kind in ("parent", "job"):
            slope = (per_round[last].get(kind, 0) - per_round[first].get(kind, 0)) / (last - first)
            peak = max(rss.get(kind, 0) for _, rss in samples)
            print(f"\n{kind}: {slope:+.2f} MiB per round from round {first} to {last}; peak {peak:.0f} MiB", end="")
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
