"""How the cost grows with the number of sites and the image size (``python tools/study.py --scale``).

    python tools/study.py --scale --out DIR [--scale-sites 3 6 12 24] [--scale-sizes 64 96 192 384]

Sites: a FedAvg federation of tiny phantom prostate sites (32 x 32 x 8, 3 cases; the six
scanner profiles repeated under new names past six sites) in the NVFlare simulator, 3 rounds,
one process per site as the job scripts run it (``--scale-processes N``: at most N at a time;
with fewer processes than sites the simulator swaps sites in and out of them every round).
Per site count: seconds per round (between aggregations in the server log), the slowest
site's own task, simulator overhead ((round - slowest site task) / round), and the peak RSS
of the server process and of the largest site process.

Image size: one training step of the prostate bundle's network (2.5D UNet, batch 2 volumes x
8 slabs = 16 inputs of 3 x S x S, Adam), each size in a fresh process: median seconds per
step over 5 steps after 2 warm-up steps, and the process's peak RSS.

Writes DIR/scaling.json, DIR/scaling.md (tables) and DIR/scaling.png.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

from fedharmony.study.simulator_timing import peak_rss, round_times, site_task_times
from fedharmony.study.tasks import PRESETS

REPO = Path(__file__).resolve().parents[3]  # <checkout>/custom/fedharmony/study/scaling.py: jobs/ and bundles/

SITES = (3, 6, 12, 24)
SIZES = (64, 96, 192, 384)
TINY_OVERRIDES = PRESETS["smoke"]["prostate"].overrides  # the smoke study's tiny bundle settings
MAX_PROCESSES = 0  # 0: one process per site

_STEP = r"""
import json, resource, statistics, sys, time
import torch
from fedharmony.bundle.networks import build_network
torch.set_num_threads(1)
size = int(sys.argv[1])
net = build_network(sys.argv[2], overrides={"image_size": size}, seed=0).train()
opt = torch.optim.Adam(net.parameters(), lr=1e-3)
loss_fn = torch.nn.CrossEntropyLoss()
x = torch.randn(16, 3, size, size)
y = torch.randint(0, 2, (16, size, size))
times = []
for i in range(7):
    t0 = time.perf_counter()
    opt.zero_grad()
    loss_fn(net(x), y).backward()
    opt.step()
    times.append(time.perf_counter() - t0)
print(json.dumps({"step_s": statistics.median(times[2:]), "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def _sites_data(out: Path, n: int) -> Path:
    from fedharmony.phantom import load_profiles
    from fedharmony.phantom.sites import write_sites

    base = list(load_profiles().values())
    profiles = []
    for i in range(n):  # past the six profiles: the same scanners again, as new sites with new names
        profile = base[i % len(base)]
        profiles.append(profile if i < len(base) else replace(profile, name=f"{profile.name}{i // len(base) + 1}"))
    data = out / f"data_{n}"
    if not (data / "sites.json").is_file():
        write_sites(data, profiles, seed=0, cases=3, size=32, slices=8)
    return data


def measure_sites(out: Path, n: int, rounds: int = 3, max_processes: int = MAX_PROCESSES) -> dict:
    processes = min(n, max_processes) if max_processes > 0 else n
    data = _sites_data(out, n)
    ws_root, name = out / "sim", f"scale_{n}_sites"
    cmd = [sys.executable, str(REPO / "jobs" / "prostate.py"), "--algorithm", "fedavg", "--rounds", str(rounds),
           "--sites", str(n), "--threads", str(processes), "--data-root", str(data),
           "--workspace", str(ws_root), "--name", name, "--override", json.dumps(TINY_OVERRIDES),
           "--no-cross-site-eval", "--verbose"]  # the job script runs the simulator itself: measured as before
    t0 = time.time()
    with peak_rss() as peaks, open(out / f"sites_{n}.log", "w") as log:
        res = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    wall = time.time() - t0
    if res.returncode != 0:
        raise RuntimeError(f"{n} sites: the simulator run failed; see {out / f'sites_{n}.log'}")
    ws = ws_root / name
    rounds_s = round_times(ws / "server" / "log.txt")
    site_s = site_task_times(ws)
    per_round = sum(rounds_s.values()) / max(len(rounds_s), 1)
    slowest = sum(site_s[r] for r in rounds_s if r in site_s) / max(len(rounds_s), 1)
    return {"sites": n, "processes": processes, "wall_s": wall, "round_s": per_round,
            "slowest_site_task_s": slowest, "overhead": (per_round - slowest) / per_round if per_round else None,
            "server_rss_mib": peaks.get("server"), "client_rss_mib": peaks.get("client")}


def measure_size(size: int) -> dict:
    res = subprocess.run([sys.executable, "-c", _STEP, str(size), str(REPO / "bundles" / "prostate_mri_seg")],
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if res.returncode != 0:
        raise RuntimeError(f"size {size}: {res.stderr[-1500:]}")
    row = json.loads(res.stdout.strip().splitlines()[-1])
    return {"size": size, **row, "step_s_per_megapixel": row["step_s"] / (16 * size * size / 1e6)}


def _plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    s = result["sites"]
    a.plot([r["sites"] for r in s], [r["round_s"] for r in s], "o-", label="s / round")
    a.plot([r["sites"] for r in s], [r["slowest_site_task_s"] for r in s], "s--", label="slowest site task")
    a.set_xlabel("sites")
    a.set_ylabel("seconds")
    a2 = a.twinx()
    a2.plot([r["sites"] for r in s], [r["server_rss_mib"] or 0 for r in s], "^:", color="grey", label="server RSS")
    a2.set_ylabel("server peak RSS (MiB)")
    a.legend(loc="upper left", fontsize=8)
    a.set_title("FedAvg, tiny sites, 3 rounds")
    z = result["sizes"]
    b.loglog([r["size"] for r in z], [r["step_s"] for r in z], "o-")
    b.set_xlabel("in-plane size (px)")
    b.set_ylabel("seconds per training step (16 inputs)")
    b.set_title("one training step, 1 thread")
    for ax in (a, b):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fit_exponent(xs, ys) -> float:
    import numpy as np

    return float(np.polyfit(np.log(xs), np.log(ys), 1)[0])


def run_scaling(out: Path, command: str = "", sites=SITES, sizes=SIZES, max_processes: int = MAX_PROCESSES) -> dict:
    import monai
    import nvflare
    import torch

    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}",
              "versions": {"torch": torch.__version__, "monai": monai.__version__, "nvflare": nvflare.__version__},
              "command": command, "sites": [], "sizes": []}
    for n in sites:
        print(f"scale: {n} sites ...", flush=True)
        result["sites"].append(measure_sites(out, n, max_processes=max_processes))
    for size in sizes:
        print(f"scale: in-plane {size} ...", flush=True)
        result["sizes"].append(measure_size(size))
    (out / "scaling.json").write_text(json.dumps(result, indent=1) + "\n")
    _plot(result, out / "scaling.png")
    lines = [f"machine: {result['machine']}; " + ", ".join(f"{k} {v}" for k, v in result["versions"].items()),
             f"command: `{command}`", "",
             "| sites | site processes | s / round | slowest site task s | simulator overhead | peak RSS server MiB "
             "| peak RSS largest site MiB |", "|---|---|---|---|---|---|---|"]
    for r in result["sites"]:
        lines.append(f"| {r['sites']} | {r['processes']} | {r['round_s']:.1f} | {r['slowest_site_task_s']:.1f} | "
                     f"{100 * (r['overhead'] or 0):.0f}% | {r['server_rss_mib'] or 0:.0f} | {r['client_rss_mib'] or 0:.0f} |")
    lines += ["", "| in-plane size | s / training step | s per megapixel | peak RSS MiB |", "|---|---|---|---|"]
    for r in result["sizes"]:
        lines.append(f"| {r['size']} | {r['step_s']:.3f} | {r['step_s_per_megapixel']:.3f} | {r['peak_rss_mib']:.0f} |")
    s, z = result["sites"], result["sizes"]
    slopes = []
    if len(s) > 1:
        slopes.append(f"round time as sites^{_fit_exponent([r['sites'] for r in s], [r['round_s'] for r in s]):.2f}")
    if len(z) > 1:
        slopes.append(f"step time as pixels^{_fit_exponent([r['size'] ** 2 for r in z], [r['step_s'] for r in z]):.2f}")
    if slopes:
        lines += ["", "Growth (least-squares slopes on log-log axes): " + "; ".join(slopes) + "."]
    (out / "scaling.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return result
