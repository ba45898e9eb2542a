"""One outside target through the bundle: segment it with a test-time method, score the masks, measure the bundle
CLI (no NVFlare import). Used by :class:`fedharmony.study.outside.OutsideStudy`.

Every method is one ``method`` of the task's bundle's ``configs/routed_inference.json`` (``bundle``: the prostate
bundle unless given), parsed with MONAI's ``ConfigParser`` as ``python -m monai.bundle run`` does; the written NIfTI
masks are scored against the site's labels afterwards (foreground Dice per volume, on the volume's own grid).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from fedharmony.study.outside_arms import labelled_cases

__all__ = ["BUNDLE", "segment", "score", "cli_cost", "labelled_folder"]

BUNDLE = Path(__file__).resolve().parents[3] / "bundles" / "prostate_mri_seg"


def segment(method: str, pool: Path, site_dir: Path, out_dir: Path, passes: int, seed: int,
            extra: Optional[dict] = None, candidate_dir: Optional[Path] = None, bundle: Path = BUNDLE) -> dict:
    """Run the bundle's routed inference config in this process for one method; returns timings and the
    adapter's history. For ``routing_safe`` with ``candidate_dir``, the adapted candidate is also written
    there, whatever the safeguard decided, so its Dice can be set against the decision."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(Path(bundle) / "configs" / "routed_inference.json"))
    parser.update({"bundle_root": str(bundle), "pool_dir": str(pool), "dataset_dir": str(site_dir),
                   "output_dir": str(out_dir), "method": method, "adaptation#passes": passes,
                   "adaptation#seed": seed, **(extra or {})})
    parser.get_parsed_content("initialize")
    adapter, evaluator = parser.get_parsed_content("adapter"), parser.get_parsed_content("evaluator")
    t0 = time.time()
    adapter.run()
    t1 = time.time()
    if candidate_dir is not None:
        network = parser.get_parsed_content("network")
        decided = network.use_fallback
        network.use_fallback = False
        evaluator.run()
        if candidate_dir.exists():
            shutil.rmtree(candidate_dir)
        Path(out_dir).rename(candidate_dir)
        network.use_fallback = decided
        t1 = time.time()
    evaluator.run()
    return {"adapt_s": t1 - t0, "infer_s": time.time() - t1, "history": adapter.history}


def score(site_dir: Path, pred_dir: Path) -> dict:
    """{case: Dice} for every labelled volume of the site."""
    from fedharmony.core.results import mask_dice

    out = {}
    for case, label in _labels(site_dir).items():
        out[case] = mask_dice(Path(pred_dir) / f"{case}_seg.nii.gz", label)
    if not out:
        raise RuntimeError(f"no labelled volume in {site_dir}")
    return out


# the bundle CLI, reporting its own peak RSS (VmHWM) at exit: ru_maxrss of a child would
# include this (large) parent process's memory at fork time
_CLI_WITH_PEAK = ("import atexit, runpy, sys\n"
                  "atexit.register(lambda: print('PEAK_KIB', [l.split()[1] for l in open('/proc/self/status') "
                  "if l.startswith('VmHWM')][0], file=sys.stderr))\n"
                  "sys.argv[0] = 'monai.bundle'\n"
                  "runpy.run_module('monai.bundle', run_name='__main__')")


def cli_cost(method: str, pool: Path, site_dir: Path, out_dir: Path, passes: int, bundle: Path = BUNDLE) -> dict:
    """The bundle CLI as a user runs it, in its own process: wall seconds and peak RSS (MiB)."""
    cmd = [sys.executable, "-c", _CLI_WITH_PEAK, "run", "--config_file",
           str(Path(bundle) / "configs" / "routed_inference.json"), "--bundle_root", str(bundle), "--pool_dir", str(pool),
           "--dataset_dir", str(site_dir), "--output_dir", str(out_dir), "--method", method,
           "--adaptation#passes", str(passes)]
    t0 = time.time()
    res = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.time() - t0
    peak = [line.split()[1] for line in res.stderr.splitlines() if line.startswith("PEAK_KIB")]
    if res.returncode != 0 or not peak:
        raise RuntimeError(f"bundle CLI ({method}) failed:\n{res.stderr[-2000:]}")
    return {"wall_s": wall, "peak_rss_mib": int(peak[-1]) / 1024}


def _labels(site_dir: Path) -> dict:
    """{case: its label file}: each ``CaseNN_segmentation.nii.gz`` whose scan ``CaseNN.nii.gz`` is there (another
    label set's ``CaseNN_<set>_segmentation.nii.gz`` has no scan of that name)."""
    found = {p.name[:-len("_segmentation.nii.gz")]: p for p in sorted(Path(site_dir).glob("*_segmentation.nii.gz"))}
    return {case: p for case, p in found.items() if (Path(site_dir) / f"{case}.nii.gz").is_file()}


def labelled_folder(site_dir: Path, folder: Path) -> Path:
    """``folder`` holding copies of the labels of the site's :func:`labelled_cases` (the ``labelled_dir``)."""
    labels = _labels(site_dir)
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for case in labelled_cases(labels):
        shutil.copyfile(labels[case], folder / labels[case].name)
    return folder
