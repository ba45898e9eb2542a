"""tools/gpu_check.py on CPU (``--device cpu --tiny``): the script a lent GPU machine runs, tested where there is none.

The whole run starts two simulator federations and a MONAI CLI run (integration, about 70 s on 2 idle cores);
the failure and budget tests run only the cheap parts (fast). Every run here hides the packages the GPU machines
lack and tools/gpu_carry.sh does not carry, so a part that would need one fails here first.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / "tools" / "gpu_check.py"
PARTS = ["machine", "copy_bandwidth", "ampnorm_torch", "ampnorm_cupy", "train_step", "routed_inference",
         "federation"]
CHEAP = ["machine", "copy_bandwidth", "ampnorm_torch", "ampnorm_cupy", "train_step"]
# installed here, absent on the GPU machines (/work/.library/device/KINDS.md) and not carried there (tools/gpu_carry.sh):
# SimpleITK (a 53 MB wheel: the inference configs import it lazily) and NVFlare's dashboard and docker needs
NOT_ON_GPU_MACHINE = ("SimpleITK", "flask", "flask_jwt_extended", "flask_sqlalchemy", "sqlalchemy",
                      "jwt", "gunicorn", "docker", "itsdangerous", "blinker", "importlib_resources")


def run_check(tmp_path, *args, timeout=600):
    """``gpu_check.py --device cpu --tiny --out tmp_path/out ARGS``; returns (exit status, report, markdown, output)."""
    hidden = tmp_path / "hidden"
    hidden.mkdir(exist_ok=True)
    for name in NOT_ON_GPU_MACHINE:
        (hidden / f"{name}.py").write_text(f"raise ImportError('{name} is not on the GPU machines (test)')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hidden), os.environ.get("PYTHONPATH", "")]).rstrip(":")}
    out = tmp_path / "out"
    res = subprocess.run([sys.executable, str(TOOL), "--device", "cpu", "--tiny", "--out", str(out), *args],
                         capture_output=True, text=True, env=env, timeout=timeout, cwd=tmp_path)
    text = res.stdout[-4000:] + res.stderr[-4000:]
    assert (out / "gpu_check.json").is_file(), text
    report = json.loads((out / "gpu_check.json").read_text())
    return res.returncode, report, (out / "gpu_check.md").read_text(), text


def positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def check_layout(report, markdown):
    assert report["schema"] == 1 and report["device"] == "cpu" and report["tiny"] is True
    assert list(report["parts"]) == PARTS
    for name, rec in report["parts"].items():
        assert set(rec) == {"status", "seconds", "reason", "error", "traceback", "result"}, name
        assert f"| {name} | {rec['status']} |" in markdown, name
    assert report["finished"] and report["sizes"]["image_size"] == 32 and report["sizes"]["batch"] == 4


def test_tiny_cpu_run_measures_every_part(tmp_path):
    """In ``make test-fast`` although it starts two tiny federations (about 75 s): the issue asks that the CPU run
    of the GPU check stays in the fast suite, so a lent device never meets a path that broke unnoticed."""
    rc, report, markdown, text = run_check(tmp_path)
    check_layout(report, markdown)
    parts = report["parts"]
    cupy = parts["ampnorm_cupy"]
    assert cupy["status"] == "not available" and "CUDA" in cupy["reason"] and cupy["result"] is None
    assert {n: r["status"] for n, r in parts.items() if n != "ampnorm_cupy"} == \
        {n: "ok" for n in PARTS if n != "ampnorm_cupy"}, text + json.dumps(parts, indent=1)[-4000:]
    assert rc == 0, text
    for name, rec in parts.items():
        assert rec["seconds"] is not None and rec["seconds"] >= 0 and rec["error"] is None, name

    assert parts["machine"]["result"]["gpu"] is None and parts["machine"]["result"]["torch"]
    assert positive(parts["copy_bandwidth"]["result"]["gb_per_s"])
    amp = parts["ampnorm_torch"]["result"]
    assert amp["shape"] == [4, 3, 32, 32] and amp["equal_to_cpu"] is True
    assert all(positive(amp[k]) for k in ("median_s", "gb_per_s", "share_of_copy_bandwidth"))
    step = parts["train_step"]["result"]
    assert list(step["variants"]) == ["fedavg", "fedavg + AmpNorm", "harmofl", "harmofl without AmpNorm"]
    assert all(positive(v["median_s"]) and positive(v["peak_mib"]) for v in step["variants"].values())
    assert step["variants"]["harmofl"]["wp_alpha"] > 0 and step["variants"]["fedavg + AmpNorm"]["wp_alpha"] == 0
    assert all(math.isfinite(step[k]) for k in ("ampnorm_share_harmofl", "ampnorm_share_harmofl_direct",
                                                "ampnorm_share_fedavg"))
    routed = parts["routed_inference"]["result"]
    assert all(positive(routed[k]) for k in ("s_per_volume", "adaptation_s_per_volume", "peak_rss_mib"))
    fed = parts["federation"]["result"]
    assert list(fed["runs"]) == ["harmofl", "fedavg"]
    for algo, run in fed["runs"].items():
        assert run["status"] == "ok" and run["rounds_timed"] == 1, algo
        assert positive(run["round_s"]) and positive(run["wall_s"]) and positive(run["peak_rss_site_mib"]), algo


def test_a_failed_part_is_recorded_and_the_next_parts_still_run(tmp_path):
    rc, report, markdown, text = run_check(tmp_path, "--parts", *CHEAP, "--fail-part", "copy_bandwidth")
    check_layout(report, markdown)
    assert rc == 1, text
    parts = report["parts"]
    failed = parts["copy_bandwidth"]
    assert failed["status"] == "error" and "injected failure (--fail-part copy_bandwidth)" in failed["error"]
    assert failed["traceback"].startswith("Traceback") and "run_part" in failed["traceback"]
    assert "## Errors" in markdown and "injected failure" in markdown
    # the parts after it ran; AmpNorm has no copy bandwidth to compare with
    assert parts["ampnorm_torch"]["status"] == "ok" and parts["ampnorm_torch"]["result"]["share_of_copy_bandwidth"] is None
    assert parts["ampnorm_cupy"]["status"] == "not available"
    assert parts["train_step"]["status"] == "ok" and positive(parts["train_step"]["result"]["variants"]["harmofl"]["median_s"])
    for name in ("routed_inference", "federation"):
        assert parts[name]["status"] == "skipped" and parts[name]["reason"] == "not selected (--parts)"


def test_a_small_budget_skips_what_would_not_fit_and_says_so(tmp_path):
    rc, report, markdown, text = run_check(tmp_path, "--budget-s", "9")  # < 10 s: train_step never fits
    check_layout(report, markdown)
    assert rc == 0, text
    parts = report["parts"]
    assert parts["machine"]["status"] == "ok"
    for name in ("train_step", "routed_inference", "federation"):  # estimated 10, 25 and 60 s on CPU
        rec = parts[name]
        assert rec["status"] == "skipped" and rec["result"] is None, name
        assert rec["reason"].startswith("would not fit: about ") and "left of --budget-s 9" in rec["reason"], name
        assert rec["reason"] in markdown
