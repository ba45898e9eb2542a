#!/usr/bin/env python
"""The GPU check: the cupy FFT path, paper-size training steps, a federation and routed inference, timed on one device.

    python tools/gpu_check.py [--device cuda|cpu] [--out DIR] [--budget-s 420] [--parts NAME ...]
    python tools/gpu_check.py --device cpu --tiny --out DIR      # the same code paths, small, on CPU (a fast test)

Written to be run as it is on a machine lent for a few minutes: every part runs in its own try block
(a failure is recorded with its traceback and the next part still runs), the results are rewritten after
every part (a run killed at its time limit still leaves what it measured), and a part that would not fit
in what is left of ``--budget-s`` is skipped and says so. Writes ``DIR/gpu_check.json`` (schema below) and
``DIR/gpu_check.md`` (the same figures as tables). How to carry what the device lacks, and the one command
to run there: docs/performance.md, "On a GPU: tools/gpu_check.py".

Parts, in order (sizes: ``paper``, the prostate ``paper`` preset of ``fedharmony.study.tasks``, 384 x 384 and
the bundle's batch of batch_size x samples_per_volume = 16 slices; ``--tiny``, the ``smoke`` preset, 32 x 32,
batch 4, base_features 4):

* ``machine``: GPU name and memory, driver (nvidia-smi) and CUDA runtime (torch's, cupy's), the versions of
  torch, cupy, monai, nvflare and of the packages the parts rely on, the CPU.
* ``copy_bandwidth``: one large device-to-device tensor copy (1 GiB; ``--tiny`` 16 MiB), median of repeated
  copies after warm-up, as GB/s counting the bytes read and written: the reference for AmpNorm's bandwidth.
* ``ampnorm_torch``, ``ampnorm_cupy``: ``fedharmony.methods.harmofl.harmonize.amplitude_normalize`` with each
  backend on B x 3 x S x S float32 (the bundle's window ratio), median of repeated calls after warm-up; effective
  bandwidth = (bytes read + bytes written) / time, and its share of the copy bandwidth; the result must equal the
  CPU result within float32 tolerance (max |difference| <= 1e-4 x max |CPU result|), else the part fails with
  the numbers kept. The cupy part is "not available" without CUDA or cupy.
* ``train_step``: one training step of the prostate bundle's network (its loss, optimizer and settings, from
  train.json / harmofl.json) on a paper-size batch: FedAvg (one forward and backward), FedAvg with AmpNorm
  (harmofl.json with wp_alpha 0), HarmoFL (AmpNorm + weight perturbation: two forwards and backwards, through
  ``fedharmony.methods.harmofl.perturbation.perturbed_step`` as the bundle's trainer runs it) and HarmoFL without
  AmpNorm (amp_mode off); median step time and peak memory of each. AmpNorm's share of the HarmoFL step is
  1 - t(HarmoFL without AmpNorm) / t(HarmoFL), and, as a check, 2 x t(one AmpNorm call) / t(HarmoFL).
* ``routed_inference``: IOP-FL routed inference (``configs/routed_inference.json`` with ``--method routing``, test-time
  adaptation, ``python -m monai.bundle run``, as ``tools/benchmark_inference.py`` runs it) of 2 phantom volumes
  (12 slices; ``--tiny`` 8) over a pool of 3 untrained experts: seconds per volume, adaptation seconds per volume,
  peak memory.
* ``federation``: a 3-site (BIDMC, HK, UCL phantom sites, 4 cases x 12 slices; ``--tiny`` 3 x 8), 2-round
  prostate federation in the NVFlare simulator through ``jobs/prostate.py`` (one process per site, no cross-site
  evaluation), HarmoFL then FedAvg: seconds per round (between the server's two aggregations), the whole run, and
  peak memory of the federation's processes. Each of the two runs is skipped when it would not fit.

Timing: on CUDA every timed call is bracketed by ``torch.cuda.Event`` records and synchronized; peak GPU memory is
``torch.cuda.max_memory_allocated`` inside this process, and for the federation and routed inference (other
processes) the peak of the device's used memory (nvidia-smi, sampled every 0.5 s, CUDA contexts included) above
what was in use before. On CPU the times are wall clock and memory is the peak resident set size (RSS).

JSON schema (``schema`` 1; every part always has every key, None where it does not apply)::

    {"schema": 1, "tool": "tools/gpu_check.py", "command": str, "device": "cuda" | "cpu", "tiny": bool,
     "budget_s": float, "started": ISO time, "finished": ISO time or None (still running), "wall_s": float,
     "sizes": {...what was run...},
     "parts": {name: {"status": "ok" | "error" | "skipped" | "not available" | "pending",
                      "seconds": float | None, "reason": str | None, "error": str | None,
                      "traceback": str | None, "result": {...} | None}}}

``--fail-part NAME`` makes that part raise at its start: for the tests (a failure is recorded and the next part
runs), not for use.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import json
import os
import platform
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
BUNDLE = REPO / "bundles" / "prostate_mri_seg"
SCHEMA = 1
# the cheap parts first, the federation (the longest, and the likeliest to hit the budget) last
PARTS = ("machine", "copy_bandwidth", "ampnorm_torch", "ampnorm_cupy", "train_step", "routed_inference",
         "federation")
# seconds each part is expected to take (GPU at paper size; --tiny on a 2-core CPU): a part is skipped when less than
# this is left of --budget-s. The GPU figures are estimates made before any GPU run; correct them after the first.
ESTIMATE_S = {
    "paper": {"machine": 5, "copy_bandwidth": 5, "ampnorm_torch": 10, "ampnorm_cupy": 10, "train_step": 45,
              "federation": 150, "routed_inference": 60},
    "tiny": {"machine": 2, "copy_bandwidth": 1, "ampnorm_torch": 2, "ampnorm_cupy": 1, "train_step": 10,
             "federation": 60, "routed_inference": 25},
}
FEDERATION_RUN_S = {"paper": 70, "tiny": 25}  # one of the federation's two simulator runs
TOLERANCE = 1e-4  # float32 FFT round trip: max |backend - CPU| <= TOLERANCE x max |CPU|
TARGETS = {"ampnorm_bandwidth_share": 0.40, "ampnorm_step_share": 0.05}  # from the issue: >= 40 %, < 5 %
FEDERATION_SITES = ("BIDMC", "HK", "UCL")
# versions recorded by the machine part: what the GPU machines hold and what is carried to them (tools/gpu_carry.sh)
PACKAGES = ("pytorch-ignite", "nibabel", "fire", "pydantic", "pydantic-core", "typing-extensions", "cryptography",
            "grpcio", "protobuf", "scipy", "SimpleITK")


class NotAvailable(Exception):
    """A part that cannot run on this machine (not a failure): cupy without CUDA, say."""


# ----------------------------------------------------------------------------------------------- sizes, timing


def sizes_for(tiny: bool) -> dict:
    """What each part runs: the prostate ``paper`` preset (``--tiny``: ``smoke``) and the bundle's own values."""
    from fedharmony.bundle.networks import build_network
    from fedharmony.study.tasks import preset_for

    preset = preset_for("smoke" if tiny else "paper", "prostate")
    size = preset.data["size"]
    overrides = {**preset.overrides, "image_size": size}

    def value(key, files=("configs/train.json",)):
        return build_network(str(BUNDLE), list(files), key=key, overrides=overrides, seed=None)

    return {"preset": "smoke" if tiny else "paper", "image_size": size, "overrides": overrides,
            "batch": value("batch_size") * value("samples_per_volume"),
            "amp_ratio": value("amp_ratio", ("configs/train.json", "configs/harmofl.json")),
            "wp_alpha": value("wp_alpha", ("configs/train.json", "configs/harmofl.json")),
            "copy_mib": 16 if tiny else 1024, "repeats": 3 if tiny else 20, "warmup": 1 if tiny else 3,
            "step_repeats": 3 if tiny else 10, "step_warmup": 1 if tiny else 2,
            "federation": {"sites": list(FEDERATION_SITES), "cases": preset.data.get("cases", 4),
                           "slices": preset.data.get("slices", 12), "rounds": 2, "local_epochs": 1},
            "routed": {"volumes": 2, "slices": 8 if tiny else 12}}


def time_calls(fn, device, repeats: int, warmup: int) -> list:
    """Seconds of each of ``repeats`` calls of ``fn`` after ``warmup`` calls: CUDA events around each call and a
    synchronize after it on CUDA, the wall clock on CPU."""
    import torch

    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return times


def timing(times: list) -> dict:
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "n": len(times)}


def rss_mib() -> float:
    """This process's peak resident set size so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def nvidia_smi(*query: str) -> list:
    """Rows of ``nvidia-smi --query-...`` (csv, no header, no units), [] where nvidia-smi is missing or fails."""
    try:
        out = subprocess.run(["nvidia-smi", *query, "--format=csv,noheader,nounits"], capture_output=True, text=True,
                             timeout=20)
    except (OSError, subprocess.SubprocessError):
        return []
    return [[c.strip() for c in line.split(",")] for line in out.stdout.splitlines() if line.strip()] \
        if out.returncode == 0 else []


class DeviceMemorySampler:
    """Peak memory in use on GPU 0 (MiB, every process) while other processes run, and what was in use before.

    nvidia-smi's ``memory.used`` (CUDA contexts included); where nvidia-smi is missing, ``torch.cuda.mem_get_info``.
    """

    def __init__(self, interval: float = 0.5):
        self.interval, self.peak, self.before, self.source = interval, 0.0, 0.0, None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def read(self) -> float:
        rows = nvidia_smi("--query-gpu=memory.used", "-i", "0")
        if rows:
            self.source = "nvidia-smi memory.used"
            return float(rows[0][0])
        import torch

        self.source = "torch.cuda.mem_get_info"
        free, total = torch.cuda.mem_get_info(0)
        return (total - free) / 2 ** 20

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.read())
            self._stop.wait(self.interval)

    def __enter__(self):
        self.before = self.peak = self.read()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def result(self) -> dict:
        return {"peak_gpu_used_mib": round(self.peak), "gpu_used_before_mib": round(self.before),
                "peak_gpu_above_before_mib": round(self.peak - self.before), "gpu_memory_source": self.source}


# ---------------------------------------------------------------------------------------------------- the parts


def part_machine(ctx, rec):
    """GPU, driver, CUDA runtime, library versions, CPU."""
    import torch

    from fedharmony.study.provenance import cpu_description

    def version(name):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    r = rec["result"] = {"python": platform.python_version(), "machine": platform.machine(),
                         "cpu_cores": os.cpu_count(), "cpu": cpu_description(), "torch": torch.__version__,
                         "torch_cuda_runtime": torch.version.cuda, "monai": version("monai"),
                         "nvflare": version("nvflare"), "numpy": version("numpy"),
                         "cupy": next((v for v in (version(n) for n in ("cupy-cuda13x", "cupy-cuda12x", "cupy"))
                                       if v), None),
                         "packages": {n: version(n) for n in PACKAGES}}
    from fedharmony.methods.harmofl.harmonize import _cupy

    cp = _cupy()
    if cp is not None:
        try:
            rt = cp.cuda.runtime.runtimeGetVersion()
            r["cupy_cuda_runtime"] = f"{rt // 1000}.{rt % 1000 // 10}"
        except Exception as e:  # cupy without a usable CUDA
            r["cupy_cuda_runtime"] = f"unavailable ({type(e).__name__}: {e})"
    if ctx["device"].type != "cuda":
        r["gpu"] = None
        return
    props = torch.cuda.get_device_properties(0)
    smi = nvidia_smi("--query-gpu=name,driver_version,memory.total", "-i", "0")
    r.update({"gpu": props.name, "gpu_memory_gib": round(props.total_memory / 2 ** 30, 1),
              "multiprocessors": props.multi_processor_count, "capability": f"{props.major}.{props.minor}",
              "driver": smi[0][1] if smi else None, "cudnn": torch.backends.cudnn.version()})


def part_copy_bandwidth(ctx, rec):
    """A large device-to-device copy: (bytes read + bytes written) / time."""
    import torch

    dev, s = ctx["device"], ctx["sizes"]
    n = s["copy_mib"] * 2 ** 20 // 4
    src = torch.rand(n, device=dev)
    dst = torch.empty_like(src)
    t = timing(time_calls(lambda: dst.copy_(src), dev, s["repeats"], s["warmup"]))
    nbytes = 2 * src.numel() * src.element_size()
    rec["result"] = {"bytes_per_copy": nbytes, **t, "gb_per_s": nbytes / t["median_s"] / 1e9}
    ctx["copy_gbps"] = rec["result"]["gb_per_s"]
    del src, dst


def _ampnorm_inputs(ctx):
    """The batch, the target and the CPU result (computed once, shared by both backends)."""
    if "ampnorm" not in ctx:
        import torch

        from fedharmony.methods.harmofl.harmonize import amplitude_normalize, batch_amplitude

        s = ctx["sizes"]
        g = torch.Generator().manual_seed(0)
        images = torch.randn(s["batch"], 3, s["image_size"], s["image_size"], generator=g)
        target = batch_amplitude(torch.randn(4, 3, s["image_size"], s["image_size"], generator=g))
        ctx["ampnorm"] = (images, target, amplitude_normalize(images, target, s["amp_ratio"], backend="torch"))
    return ctx["ampnorm"]


def _ampnorm(ctx, rec, backend):
    import torch

    from fedharmony.methods.harmofl.harmonize import _cupy, amplitude_normalize

    dev, s = ctx["device"], ctx["sizes"]
    if backend == "cupy":
        if dev.type != "cuda":
            raise NotAvailable("the cupy backend runs on CUDA tensors only (device cpu)")
        if _cupy() is None:
            raise NotAvailable("cupy is not installed or finds no CUDA driver")
    images, target, ref = _ampnorm_inputs(ctx)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    x, t = images.to(dev), target.to(dev)
    out = amplitude_normalize(x, t, s["amp_ratio"], backend=backend)
    diff = float((out.float().cpu() - ref).abs().max())
    scale = float(ref.abs().max())
    nbytes = 2 * x.numel() * x.element_size()
    r = rec["result"] = {"shape": list(x.shape), "dtype": str(x.dtype).replace("torch.", ""),
                         "ratio": s["amp_ratio"], "bytes_read_written": nbytes,
                         "max_abs_diff_vs_cpu": diff, "max_rel_diff_vs_cpu": diff / scale if scale else diff,
                         "tolerance": TOLERANCE, "equal_to_cpu": diff <= TOLERANCE * scale}
    r.update(timing(time_calls(lambda: amplitude_normalize(x, t, s["amp_ratio"], backend=backend), dev,
                               s["repeats"], s["warmup"])))
    r["gb_per_s"] = nbytes / r["median_s"] / 1e9
    copy = ctx.get("copy_gbps")
    r["share_of_copy_bandwidth"] = r["gb_per_s"] / copy if copy else None
    r["target_share"] = TARGETS["ampnorm_bandwidth_share"]
    r["meets_target"] = r["share_of_copy_bandwidth"] >= TARGETS["ampnorm_bandwidth_share"] if copy else None
    if dev.type == "cuda":
        r["peak_gpu_mib"] = torch.cuda.max_memory_allocated(dev) / 2 ** 20
    if not r["equal_to_cpu"]:
        raise AssertionError(f"{backend} backend differs from the CPU result: max |difference| {diff:.3g} > "
                             f"{TOLERANCE} x max |CPU result| ({scale:.3g})")


def part_ampnorm_torch(ctx, rec):
    """AmpNorm with the torch.fft backend."""
    _ampnorm(ctx, rec, "torch")


def part_ampnorm_cupy(ctx, rec):
    """AmpNorm with the cupy.fft backend (CUDA only)."""
    _ampnorm(ctx, rec, "cupy")


# (label, bundle configs, bundle overrides of the variant): FedAvg and HarmoFL, each with and without AmpNorm
STEP_VARIANTS = (
    ("fedavg", ["configs/train.json"], {}),
    ("fedavg + AmpNorm", ["configs/train.json", "configs/harmofl.json"], {"wp_alpha": 0.0}),
    ("harmofl", ["configs/train.json", "configs/harmofl.json"], {}),
    ("harmofl without AmpNorm", ["configs/train.json", "configs/harmofl.json"], {"amp_mode": "off"}),
)


def _training_step(files, overrides, images, labels, device):
    """The bundle's network, loss and optimizer, and one training step of it as the bundle's trainer takes it
    (HarmoFL's ``WeightPerturbedIteration`` when harmofl.json is layered: alpha 0 is MONAI's plain step)."""
    from fedharmony.bundle.optim import build_optimizer
    from fedharmony.bundle.networks import build_network
    from fedharmony.methods.harmofl.networks import prime_targets, use_global_targets
    from fedharmony.methods.harmofl.perturbation import frozen_norm_statistics, perturbed_step

    def value(key, seed=None):
        return build_network(str(BUNDLE), files, key=key, overrides=overrides, seed=seed)

    net = value("network_def", seed=0).to(device).train()
    if prime_targets(net, images):  # as a site holds it after receiving the global target
        use_global_targets(net)
    loss_fn = value("loss")
    opt = build_optimizer(value("optimizer_name"), net.parameters(), value("learning_rate"), value("weight_decay"))
    alpha = value("wp_alpha") if "configs/harmofl.json" in files else 0.0

    def step():
        perturbed_step(net.parameters(), lambda: loss_fn(net(images), labels), opt, alpha,
                       second_pass=lambda: frozen_norm_statistics(net))

    return step, alpha


def part_train_step(ctx, rec):
    """One training step per variant at the preset's size and batch, and AmpNorm's share of the HarmoFL step."""
    import torch

    from fedharmony.methods.harmofl.harmonize import amplitude_normalize, batch_amplitude, select_backend

    dev, s = ctx["device"], ctx["sizes"]
    g = torch.Generator().manual_seed(1)
    shape = (s["batch"], 3, s["image_size"], s["image_size"])
    images = torch.randn(*shape, generator=g).to(dev)
    labels = (torch.rand(s["batch"], 1, *shape[2:], generator=g) > 0.7).float().to(dev)
    r = rec["result"] = {"shape": list(shape), "backend": select_backend(dev), "variants": {},
                         "cudnn_benchmark": torch.backends.cudnn.benchmark if dev.type == "cuda" else None}
    failed = {}
    for label, files, extra in STEP_VARIANTS:
        if dev.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(dev)
        try:  # the other variants still run
            step, alpha = _training_step(files, {**s["overrides"], **extra}, images, labels, dev)
            v = {**timing(time_calls(step, dev, s["step_repeats"], s["step_warmup"])), "wp_alpha": alpha}
        except Exception as e:
            failed[label] = {"error": f"{type(e).__name__}: {e}"[:2000], "traceback": traceback.format_exc()[-4000:]}
            continue
        if dev.type == "cuda":
            v.update(peak_mib=torch.cuda.max_memory_allocated(dev) / 2 ** 20, peak_kind="torch.cuda.max_memory_allocated")
        else:
            v.update(peak_mib=rss_mib(), peak_kind="process peak RSS")
        r["variants"][label] = v
    t = {k: v["median_s"] for k, v in r["variants"].items()}
    target = batch_amplitude(images[:4])
    one = statistics.median(time_calls(lambda: amplitude_normalize(images, target, s["amp_ratio"]), dev,
                                       s["repeats"], s["warmup"]))
    r.update({"ampnorm_call_s": one, "target_share": TARGETS["ampnorm_step_share"]})
    if "harmofl" in t:
        r["ampnorm_share_harmofl_direct"] = 2 * one / t["harmofl"]  # AmpNorm runs in both forward passes
    if {"harmofl", "harmofl without AmpNorm"} <= set(t):
        r["ampnorm_share_harmofl"] = 1 - t["harmofl without AmpNorm"] / t["harmofl"]
        r["meets_target"] = r["ampnorm_share_harmofl"] < TARGETS["ampnorm_step_share"]
    if {"fedavg", "fedavg + AmpNorm"} <= set(t):
        r["ampnorm_share_fedavg"] = 1 - t["fedavg"] / t["fedavg + AmpNorm"]
    if failed:
        r["failed_variants"] = failed
        raise RuntimeError("training step failed: " + "; ".join(f"{k}: {e['error']}" for k, e in failed.items()))


def _phantom_sites(ctx):
    """The federation's phantom sites (as ``write_sites`` writes them), one process per site: the generator draws
    a site's cases one after the other when they are few, about 6 s each at 384 px here."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    from fedharmony.core.files import write_site_map
    from fedharmony.phantom import load_profiles, select_profiles
    from fedharmony.phantom.sites import write_site

    f, data = ctx["sizes"]["federation"], ctx["work"] / "sites"
    if not (data / "sites.json").is_file():
        profiles = select_profiles(load_profiles(), f["sites"])
        # spawn, not fork: this process may hold a CUDA context
        with ProcessPoolExecutor(len(profiles), mp_context=get_context("spawn")) as pool:
            list(pool.map(write_site, [data] * len(profiles), profiles, [0] * len(profiles),
                          [f["cases"]] * len(profiles), [ctx["sizes"]["image_size"]] * len(profiles),
                          [f["slices"]] * len(profiles)))
        write_site_map(data, [p.name for p in profiles])
    return data


def part_federation(ctx, rec):
    """3 sites, 2 rounds in the NVFlare simulator (jobs/prostate.py), HarmoFL then FedAvg."""
    s, dev = ctx["sizes"], ctx["device"]
    f = s["federation"]
    t0 = time.perf_counter()
    data = _phantom_sites(ctx)
    r = rec["result"] = {**f, "image_size": s["image_size"], "overrides": s["overrides"],
                         "data_s": time.perf_counter() - t0, "runs": {}}
    if dev.type == "cuda":
        import torch

        torch.cuda.empty_cache()
    for algo in ("harmofl", "fedavg"):
        left = ctx["left"]()
        if left < FEDERATION_RUN_S[ctx["scale"]]:
            r["runs"][algo] = {"status": "skipped",
                               "reason": f"would not fit: about {FEDERATION_RUN_S[ctx['scale']]} s needed, "
                                         f"{max(left, 0):.0f} s left of --budget-s"}
            continue
        try:
            r["runs"][algo] = _federation_run(ctx, algo, data, timeout=left)
        except Exception as e:  # the other algorithm still runs
            r["runs"][algo] = {"status": "error", "error": f"{type(e).__name__}: {e}"[-4000:],
                               "traceback": traceback.format_exc()[-4000:]}
    failed = [a for a, run in r["runs"].items() if run["status"] == "error"]
    if failed:
        raise RuntimeError("federation failed: " + "; ".join(f"{a}: {r['runs'][a]['error']}" for a in failed))


def _federation_run(ctx, algo, data, timeout):
    """One simulator run of jobs/prostate.py, its round times and the peak memory of its processes."""
    from fedharmony.study.simulator_timing import peak_rss, round_times, site_task_times

    s, dev, f = ctx["sizes"], ctx["device"], ctx["sizes"]["federation"]
    name = f"gpu_check_{algo}"
    shutil.rmtree(ctx["work"] / "sim" / name, ignore_errors=True)  # a rerun's logs must not mix with the last's
    cmd = [sys.executable, str(REPO / "jobs" / "prostate.py"), "--algorithm", algo, "--rounds", str(f["rounds"]),
           "--local-epochs", str(f["local_epochs"]), "--sites", str(len(f["sites"])), "--data-root", str(data),
           "--workspace", str(ctx["work"] / "sim"), "--name", name, "--override", json.dumps(s["overrides"]),
           "--no-cross-site-eval", "--verbose"]
    gpu = DeviceMemorySampler() if dev.type == "cuda" else contextlib.nullcontext()
    log = ctx["work"] / f"{name}.log"
    start = time.perf_counter()
    with peak_rss() as peaks, gpu, open(log, "w") as out:  # no ps on the machine: no RSS figures, the run goes on
        rc = run_group(cmd, out, timeout)
    wall = time.perf_counter() - start
    if rc != 0:
        raise RuntimeError(f"{algo} federation {'timed out' if rc is None else f'failed (exit {rc})'}; the end of "
                           f"{log}:\n" + "\n".join(log.read_text(errors="replace").splitlines()[-80:]))
    ws = ctx["work"] / "sim" / name
    rounds, sites = round_times(ws / "server" / "log.txt"), site_task_times(ws)
    run = {"status": "ok", "wall_s": wall, "round_s": sum(rounds.values()) / len(rounds) if rounds else None,
           "rounds_timed": len(rounds), "slowest_site_task_s": {str(k): v for k, v in sorted(sites.items())},
           "peak_rss_server_mib": peaks.get("server"), "peak_rss_site_mib": peaks.get("client")}
    if dev.type == "cuda":
        run.update(gpu.result())
    return run


def run_group(cmd, out, timeout):
    """Run ``cmd`` in a process group of its own (the simulator starts site processes); on timeout end the whole
    group and return None, else the exit status."""
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        return proc.wait(timeout=max(timeout, 1))
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 9)
        proc.wait()
        return None


def part_routed_inference(ctx, rec):
    """IOP-FL routed inference of 2 volumes with test-time adaptation (configs/routed_inference.json)."""
    from benchmark_inference import run_config, write_models, write_volumes

    s, dev = ctx["sizes"], ctx["device"]
    work = ctx["work"] / "routed"
    shutil.rmtree(work, ignore_errors=True)  # a rerun starts clean (existing masks are kept, and refused)
    write_volumes(work / "in", s["image_size"], s["routed"]["volumes"], s["routed"]["slices"])
    configs = write_models(work, s["image_size"])
    threads = 2 if ctx["scale"] == "tiny" else max(1, min(8, os.cpu_count() or 1))
    if dev.type == "cuda":
        import torch

        torch.cuda.empty_cache()  # what this process still holds counts in the device's used memory
    gpu = DeviceMemorySampler() if dev.type == "cuda" else contextlib.nullcontext()
    with gpu:
        run = run_config(configs["routed"], work / "in", work / "out", threads, timeout=max(ctx["left"](), 1))
    r = rec["result"] = {**s["routed"], "image_size": s["image_size"], "experts": 3, "threads": threads,
                         "s_per_volume": run["per_volume"], "adaptation_s_per_volume": run["adapt"],
                         "s_per_volume_with_adaptation": run["per_volume"] + (run["adapt"] or 0.0),
                         "wall_s": run["wall"], "peak_rss_mib": run["peak_mib"]}
    if dev.type == "cuda":
        r.update(gpu.result())


# ------------------------------------------------------------------------------------------- running, writing


def new_record() -> dict:
    return {"status": "pending", "seconds": None, "reason": None, "error": None, "traceback": None, "result": None}


def run_part(name, ctx, rec, fail_parts):
    """Run one part in its own try block: its record says ok, not available or error (with the traceback)."""
    t0 = time.perf_counter()
    try:
        if name in fail_parts:
            raise RuntimeError(f"injected failure (--fail-part {name})")
        globals()[f"part_{name}"](ctx, rec)
        rec["status"] = "ok"
    except NotAvailable as e:
        rec["status"], rec["reason"] = "not available", str(e)
    except Exception as e:  # a part's failure (a timeout too) must not stop the next part
        rec["status"], rec["error"], rec["traceback"] = "error", f"{type(e).__name__}: {e}"[:4000], \
            traceback.format_exc()[-8000:]
    rec["seconds"] = time.perf_counter() - t0


def fmt(v, spec=".2f", unit=""):
    return "-" if v is None else f"{v:{spec}}{unit}"


def pct(v):
    return "-" if v is None else f"{100 * v:.1f}%"


def met(flag):
    return "" if flag is None else (", met" if flag else ", not met")


def summary_line(name, rec) -> str:
    """One table cell of a part's main figures (never raises: a part that failed half-way has half its figures)."""
    try:
        return _summary(name, rec)
    except Exception:
        return (rec["error"] or "figures incomplete").splitlines()[0][:200]


def _summary(name, rec) -> str:
    r = rec["result"] or {}
    if rec["status"] in ("skipped", "not available", "pending"):
        return rec["reason"] or ""
    if rec["status"] == "error" and not r:
        return rec["error"].splitlines()[0][:200]
    if name == "machine":
        gpu = f"{r['gpu']}, {r['gpu_memory_gib']} GiB, driver {r.get('driver')}" if r.get("gpu") else "no GPU"
        return (f"{gpu}; CUDA runtime {r.get('torch_cuda_runtime')} (torch), {r.get('cupy_cuda_runtime', '-')} (cupy); "
                f"torch {r['torch']}, cupy {r.get('cupy')}, monai {r.get('monai')}, nvflare {r.get('nvflare')}")
    if name == "copy_bandwidth":
        return f"{r['gb_per_s']:.4g} GB/s ({r['bytes_per_copy'] / 2 ** 20:.0f} MiB read + written, median of {r['n']})"
    if name.startswith("ampnorm"):
        return (f"{fmt(r.get('median_s') and 1e3 * r['median_s'], '.3f')} ms, {fmt(r.get('gb_per_s'), '.3g')} GB/s = "
                f"{pct(r.get('share_of_copy_bandwidth'))} of copy (target >= {pct(TARGETS['ampnorm_bandwidth_share'])}"
                f"{met(r.get('meets_target'))}); max rel. diff to CPU {r['max_rel_diff_vs_cpu']:.1e}")
    if name == "train_step":
        v = r.get("variants", {})
        return "; ".join(f"{k} {1e3 * x['median_s']:.1f} ms" for k, x in v.items()) + \
            (f"; AmpNorm {pct(r['ampnorm_share_harmofl'])} of the HarmoFL step (target < "
             f"{pct(TARGETS['ampnorm_step_share'])}{met(r.get('meets_target'))}; 2 calls / step: "
             f"{pct(r.get('ampnorm_share_harmofl_direct'))})" if "ampnorm_share_harmofl" in r else "")
    if name == "federation":
        runs = r.get("runs", {})
        return "; ".join(f"{a} {fmt(x.get('round_s'), '.1f')} s/round ({fmt(x.get('wall_s'), '.0f')} s run)"
                         if x["status"] == "ok" else f"{a} {x['status']}" for a, x in runs.items()) or "-"
    if name == "routed_inference":
        return (f"{r['s_per_volume']:.2f} s/volume + {fmt(r['adaptation_s_per_volume'])} s adaptation = "
                f"{r['s_per_volume_with_adaptation']:.2f} s/volume")
    return ""


def peak_line(name, rec) -> str:
    try:
        return _peaks(name, rec)
    except Exception:
        return "-"


def _peaks(name, rec) -> str:
    r = rec["result"] or {}
    if name == "train_step" and r.get("variants"):
        return ", ".join(f"{k} {x['peak_mib']:.0f}" for k, x in r["variants"].items())
    if name == "federation" and r.get("runs"):
        cells = []
        for a, x in r["runs"].items():
            if x["status"] != "ok":
                continue
            gpu = f"GPU {x['peak_gpu_above_before_mib']}, " if "peak_gpu_above_before_mib" in x else ""
            cells.append(f"{a}: {gpu}RSS server {fmt(x['peak_rss_server_mib'], '.0f')} / site "
                         f"{fmt(x['peak_rss_site_mib'], '.0f')}")
        return "; ".join(cells) or "-"
    if name == "routed_inference" and r:
        gpu = f"GPU {r['peak_gpu_above_before_mib']}, " if "peak_gpu_above_before_mib" in r else ""
        return f"{gpu}RSS {r['peak_rss_mib']:.0f}"
    if name.startswith("ampnorm") and r.get("peak_gpu_mib") is not None:
        return f"GPU {r['peak_gpu_mib']:.0f}"
    return "-"


def markdown(report: dict) -> str:
    m = (report["parts"]["machine"]["result"] or {})
    lines = [f"# GPU check ({report['device']}{', tiny' if report['tiny'] else ''})", "",
             f"command: `{report['command']}`  ",
             f"started {report['started']}, {'finished ' + report['finished'] if report['finished'] else 'running'}, "
             f"{report['wall_s']:.0f} s of --budget-s {report['budget_s']:.0f}  ",
             f"sizes: preset {report['sizes'].get('preset')}, {report['sizes'].get('image_size')} px, "
             f"batch {report['sizes'].get('batch')}  ",
             f"machine: {m.get('gpu') or 'no GPU'}; {m.get('cpu', '?')}, {m.get('cpu_cores', '?')} cores; Python "
             f"{m.get('python', '?')}", "",
             "| part | status | figures | peak memory MiB | s |", "|---|---|---|---|---|"]
    for name, rec in report["parts"].items():
        cell = summary_line(name, rec).replace("|", "/").replace("\n", " ")
        lines.append(f"| {name} | {rec['status']} | {cell} | {peak_line(name, rec)} | {fmt(rec['seconds'], '.1f')} |")
    errors = [(n, rec) for n, rec in report["parts"].items() if rec["status"] == "error"]
    if errors:
        lines += ["", "## Errors", ""]
        for n, rec in errors:
            lines += [f"### {n}", "", "```", (rec["traceback"] or rec["error"] or "").rstrip()[-3000:], "```", ""]
    return "\n".join(lines) + "\n"


def write(report: dict, out: Path):
    out.mkdir(parents=True, exist_ok=True)
    for name, text in (("gpu_check.json", json.dumps(report, indent=2, default=str) + "\n"),
                       ("gpu_check.md", markdown(report))):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(out / name)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda where a CUDA device is present")
    p.add_argument("--tiny", action="store_true", help="small sizes (the smoke preset): the same code paths, fast")
    p.add_argument("--out", default=str(REPO / "workspace" / "gpu_check"), help="where the JSON and Markdown go")
    p.add_argument("--work", help="scratch folder for data and simulator workspaces (default: OUT/work)")
    p.add_argument("--budget-s", type=float, default=420, help="skip parts that would not fit in this many seconds")
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="run only these parts")
    p.add_argument("--fail-part", action="append", default=[], choices=PARTS, metavar="NAME",
                   help="for tests: make this part raise at its start")
    args = p.parse_args(argv)
    if args.device == "cpu":  # and for every process started here (simulator, monai.bundle)
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    import torch

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch finds no CUDA device here (use --device cpu)")
    out = Path(args.out).resolve()
    work = Path(args.work).resolve() if args.work else out / "work"
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()  # set again below, once the sizes are read: the budget is the parts' time
    scale = "tiny" if args.tiny else "paper"
    ctx = {"device": torch.device(args.device), "work": work, "scale": scale,
           "left": lambda: args.budget_s - (time.perf_counter() - t_start)}
    report = {"schema": SCHEMA, "tool": "tools/gpu_check.py",
              "command": shlex.join(["python", "tools/gpu_check.py", *(argv if argv is not None else sys.argv[1:])]),
              "device": args.device, "tiny": args.tiny, "budget_s": args.budget_s,
              "started": datetime.datetime.now().isoformat(timespec="seconds"), "finished": None, "wall_s": 0.0,
              "sizes": {}, "parts": {name: new_record() for name in PARTS}}
    try:
        ctx["sizes"] = report["sizes"] = sizes_for(args.tiny)
    except Exception:  # without sizes no part can run: say why in every record
        for rec in report["parts"].values():
            rec.update(status="error", error="the bundle's sizes could not be read", traceback=traceback.format_exc())
        write(report, out)
        print(traceback.format_exc(), file=sys.stderr)
        return 1
    # the budget counts from here: reading the sizes imports MONAI, which takes seconds on a loaded machine and
    # would otherwise eat a small budget before the first part
    t_start = time.perf_counter()
    for name in PARTS:
        rec = report["parts"][name]
        left, need = ctx["left"](), ESTIMATE_S[scale][name]
        if name not in args.parts:
            rec.update(status="skipped", reason="not selected (--parts)")
        elif left < need:
            rec.update(status="skipped", reason=f"would not fit: about {need} s needed, {max(left, 0):.0f} s left "
                                                f"of --budget-s {args.budget_s:.0f}")
        else:
            print(f"[gpu_check] {name} ...", flush=True)
            run_part(name, ctx, rec, set(args.fail_part))
        print(f"[gpu_check] {name}: {rec['status']} {summary_line(name, rec)}", flush=True)
        report["wall_s"] = time.perf_counter() - t_start
        write(report, out)
    report["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
    report["wall_s"] = time.perf_counter() - t_start
    write(report, out)
    print(f"[gpu_check] wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'} ({report['wall_s']:.0f} s)")
    return 1 if any(r["status"] == "error" for r in report["parts"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
