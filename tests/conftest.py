"""Shared fixtures: tiny phantom sites written once per test session."""

import contextlib
import fcntl
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

import pytest

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "prostate_mri_seg"
sys.path.insert(0, str(REPO / "tools"))
os.environ.setdefault("OMP_NUM_THREADS", "1")

# tiny but real: 32 x 32 in-plane (UNet needs a multiple of 16), 8 slices, 3 cases (1 per split)
TINY = dict(size=32, slices=8, cases=3)


POC_TEST_FILES = ("tests/test_poc.py", "tests/test_poc_policy.py")


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """``make test`` (``-n 2 --dist loadfile``): one work unit per test file, except that both POC files are
    one unit, so they run one after the other on one worker instead of the second worker idling on the
    POC lock (see :func:`poc_federation`)."""
    from xdist.scheduler import LoadFileScheduling

    class POCTogether(LoadFileScheduling):
        def _split_scope(self, nodeid):
            scope = super()._split_scope(nodeid)
            return "poc" if scope.endswith(POC_TEST_FILES) else scope

    return POCTogether(config, log)


def pytest_collection_modifyitems(config, items):
    """The POC tests first (their work unit is the longest: with ``--no-loadscope-reorder`` it then starts first
    and the other worker takes the rest); the order within each file is kept."""
    items.sort(key=lambda item: not item.nodeid.split("::")[0].endswith(POC_TEST_FILES))


@pytest.fixture(scope="session")
def tiny_sites(tmp_path_factory):
    from fedharmony.phantom import load_profiles, select_profiles
    from fedharmony.phantom.sites import write_sites

    out = tmp_path_factory.mktemp("phantom")
    profiles = select_profiles(load_profiles(), ["BIDMC", "HK"])
    write_sites(out, profiles, seed=0, **TINY)
    return out


# small bundle overrides so a round is a handful of steps
TINY_OVERRIDES = {"samples_per_volume": 4, "batch_size": 1, "base_features": 4}


POC_TOOL = [sys.executable, str(REPO / "tools" / "poc.py")]


@contextlib.contextmanager
def poc_federation(base: Path, *up_flags: str):
    """Three tiny phantom sites (BIDMC, HK, UCL) under ``base/data`` and a POC federation serving
    them (``tools/poc.py up --sites 3 <up_flags>``), stopped and deleted on exit.

    A POC federation listens on fixed ports (8002, 8003), so one runs on this machine at a time: a lock file
    makes a second one (the other pytest-xdist worker, another test run) wait for the first to end."""
    from fedharmony.phantom import load_profiles, select_profiles
    from fedharmony.phantom.sites import write_sites

    data = base / "data"
    write_sites(data, select_profiles(load_profiles(), ["BIDMC", "HK", "UCL"]), seed=0, **TINY)
    root = base / "federation"
    with open(Path(tempfile.gettempdir()) / "fedharmony-poc.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, after `down`
        try:
            # NVFlare prints non-ASCII characters; decode them as UTF-8 whatever the machine's locale
            res = subprocess.run(POC_TOOL + ["--root", str(root), "up", "--sites", "3", "--data-root", str(data),
                                             *up_flags], capture_output=True, text=True, encoding="utf-8",
                                 errors="replace", timeout=300)
            assert res.returncode == 0, res.stdout + res.stderr
            yield {"root": root, "data": data, "base": base}
        finally:
            subprocess.run(POC_TOOL + ["--root", str(root), "down", "--clean"], capture_output=True, timeout=300)


NVFLARE = os.path.join(os.path.dirname(sys.executable), "nvflare")  # the venv's NVFlare command line


def export_job(base: Path, name: Optional[str] = None, *flags: str, algorithm: str = "fedavg",
               script: str = "prostate.py", overrides: Optional[dict] = None, rounds: int = 2, sites: int = 3) -> Path:
    """``jobs/<script> --export`` of a tiny job (default name ``<script>_<algorithm>``) into ``base/jobs``;
    returns the job folder."""
    name = name or f"{Path(script).stem}_{algorithm}"
    out = base / "jobs"
    cmd = [sys.executable, str(REPO / "jobs" / script), "--algorithm", algorithm, "--rounds", str(rounds),
           "--sites", str(sites), "--override", json.dumps(TINY_OVERRIDES if overrides is None else overrides),
           "--name", name, *flags, "--export", "--export-dir", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=base)
    assert res.returncode == 0, res.stdout + res.stderr
    return out / name


# NVFlare 2.9's simulator gives a fresh site process 60 s (hard-coded) to open its connection; on a loaded
# 2-core machine a process importing torch, MONAI and NVFlare can take longer, and the server then waits for that
# site forever. The same runtime flake the study tool answers by running a silent job once more.
CHILD_CONNECTION_FAILED = "Failed to create connection to the child process"


def simulate(job: Path, ws: Path, data_root: Path, sites: int = 2, threads: int = 1, timeout: int = 900) -> Path:
    """``nvflare simulator`` on an exported job (``-t threads``; with fewer threads than sites every task runs in
    a fresh site process); returns the server's run folder. A run whose server log reports that a site process
    never connected (:data:`CHILD_CONNECTION_FAILED`) is stopped and run once more, in a fresh workspace."""
    import shutil
    import signal
    import time
    import warnings

    env = {**os.environ, "FEDHARMONY_DATA_ROOT": str(data_root)}
    cmd = [NVFLARE, "simulator", str(job), "-w", str(ws), "-n", str(sites), "-t", str(threads)]
    for attempt in (1, 2):
        with tempfile.TemporaryFile("w+") as out:
            proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, text=True,
                                    start_new_session=True)
            deadline, stalled = time.time() + timeout, False
            while proc.poll() is None:
                time.sleep(2)
                log = ws / "server" / "log.txt"
                stalled = log.is_file() and CHILD_CONNECTION_FAILED in log.read_text(errors="replace")
                if stalled or time.time() > deadline:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    break
            out.seek(0)
            output = out.read()
        if stalled and attempt == 1:
            warnings.warn(f"nvflare simulator: a site process never connected ({CHILD_CONNECTION_FAILED}); "
                          "running the job once more")
            shutil.rmtree(ws, ignore_errors=True)
            continue
        if proc.returncode != 0 or stalled:
            raise AssertionError(("timed out\n" if time.time() > deadline else "") + output[-6000:])
        return ws / "server" / "simulate_job"
    raise AssertionError("unreachable")


# tiny classification sites: 32 x 32 images, a few per class and split; the bundle resized to match
TINY_CLS_OVERRIDES = {"image_size": 32, "base_features": 4, "batch_size": 8}


@pytest.fixture(scope="session")
def tiny_dermoscopy(tmp_path_factory):
    from fedharmony.phantom.dermoscopy import load_dermoscopy_profiles, write_dermoscopy_sites

    out = tmp_path_factory.mktemp("dermoscopy")
    profiles = list(load_dermoscopy_profiles().values())[:2]
    write_dermoscopy_sites(out, profiles, seed=0, images_per_site=36, size=32)
    return out


@pytest.fixture(scope="session")
def tiny_histology(tmp_path_factory):
    from fedharmony.phantom.histology import load_histology_profiles, write_histology_sites

    out = tmp_path_factory.mktemp("histology")
    profiles = list(load_histology_profiles().values())[:2]
    write_histology_sites(out, profiles, seed=0, patients=3, patches_per_patient=8, size=32)
    return out


# ------------------------------------------------------------------------------ DICOM files written here
CORONAL = (1, 0, 0, 0, 0, 1, 0, -1, 0)  # row-major: columns are the row (x), column (-z) and slice (y) directions


def sitk_image(vol_zyx, spacing=(0.7, 1.3, 3.0), origin=(10.0, -20.0, 30.0), direction=CORONAL):
    """A SimpleITK image of a (z, y, x) array with the given geometry (coronal slices by default)."""
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(vol_zyx)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    img.SetDirection(direction)
    return img


def write_series(folder, img, series_uid=None, skip=(), description="T2 AX", prefix="IM", tags=None):
    """Write ``img`` as one DICOM file per slice, ``<prefix>NNNN.dcm`` (as SimpleITK's DicomSeriesFromArray example);
    ``tags``: more (or other) tags for every slice, e.g. ``{"0008|0060": "CT", "0010|0020": "P001"}``."""
    import SimpleITK as sitk
    from pydicom.uid import generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    series_uid, study_uid, frame_of_reference = series_uid or generate_uid(), generate_uid(), generate_uid()
    d = img.GetDirection()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(img.GetDepth()):
        if k in skip:
            continue
        s = img[:, :, k]
        for tag, value in {
            "0008|0016": "1.2.840.10008.5.1.4.1.1.4", "0008|0018": generate_uid(), "0008|0060": "MR",
            "0008|103e": description, "0020|000d": study_uid, "0020|000e": series_uid,
            "0020|0013": str(k + 1), "0020|0052": frame_of_reference, "0018|0050": str(img.GetSpacing()[2]),
            "0020|0032": "\\".join(map(str, img.TransformIndexToPhysicalPoint((0, 0, k)))),
            "0020|0037": "\\".join(map(str, (d[0], d[3], d[6], d[1], d[4], d[7]))),
            "0028|0030": f"{img.GetSpacing()[1]}\\{img.GetSpacing()[0]}", **(tags or {}),
        }.items():
            s.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{prefix}{k:04d}.dcm"))
        writer.Execute(s)
    return folder


def write_non_image_dicom(path, sop_class="1.2.840.10008.5.1.4.1.1.88.11", modality="SR"):
    """A DICOM file with no pixel data (a structured report by default), written with pydicom."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.SeriesInstanceUID, ds.StudyInstanceUID = modality, generate_uid(), generate_uid()
    ds.save_as(path, enforce_file_format=True)
    return path


SAGITTAL = (0.0, 0.0, -1.0, 1.0, 0.0, 0.0, 0.0, -1.0, 0.0)  # rows along A, columns along S (SimpleITK, row-major)


def phantom_series_image(seed=0, size=48, slices=10):
    """A phantom prostate volume (RUNMC's scanner) as an axial SimpleITK int16 image with its RAS geometry in LPS."""
    import numpy as np
    import SimpleITK as sitk
    from fedharmony.phantom import load_profiles
    from fedharmony.phantom.prostate import make_case

    image, _, affine = make_case(load_profiles()["RUNMC"], seed, 0, size=size, slices=slices)
    img = sitk.GetImageFromArray(np.clip(image, 0, 32000).astype(np.int16).transpose(2, 1, 0))
    img.SetSpacing([float(abs(affine[i, i])) for i in range(3)])
    img.SetOrigin((-float(affine[0, 3]), -float(affine[1, 3]), float(affine[2, 3])))  # RAS -> LPS
    img.SetDirection((-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0))
    return img


def write_mixed_export(folder, img, series_uid=None):
    """``img`` as a DICOM series in ``folder`` together with what an export brings along: a second series of the
    same patient (ADC, its own UID), a 3-plane localizer series, and one localizer image inside ``img``'s own series
    (ImageType LOCALIZER, sagittal); every file named by a UID-like name in shuffled order, as PACS exports name
    them. Returns ``img``'s series UID."""
    import random

    import SimpleITK as sitk
    from pydicom.uid import generate_uid

    patient = {"0010|0020": "PHANTOM01", "0008|1030": "MRI PROSTATE"}
    series_uid = series_uid or generate_uid()
    write_series(folder, img, series_uid=series_uid, prefix="T2_", tags={**patient, "0020|0011": "3"})
    adc = sitk.Cast(sitk.Shrink(img, [2, 2, 1]), sitk.sitkInt16)
    write_series(folder, adc, description="ADC", prefix="ADC_", tags={**patient, "0020|0011": "5"})
    loc = sitk.Image(img.GetSize()[0], img.GetSize()[2], 1, sitk.sitkInt16) + 100
    loc.SetSpacing((2.0, 2.0, 1.0))
    loc.SetDirection(SAGITTAL)
    loc.SetOrigin(img.GetOrigin())
    write_series(folder, loc, series_uid=series_uid, prefix="LOCIMG_",  # a localizer inside the T2 series
                 tags={**patient, "0020|0011": "3", "0008|0008": "ORIGINAL\\PRIMARY\\LOCALIZER"})
    three_plane = generate_uid()
    for k, direction in enumerate([SAGITTAL, (1.0, 0, 0, 0, 0, 1.0, 0, -1.0, 0), (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0)]):
        plane = sitk.Image(32, 32, 1, sitk.sitkInt16) + 50
        plane.SetDirection(direction)
        write_series(folder, plane, series_uid=three_plane, description="3-Plane Loc", prefix=f"LOC{k}_",
                     tags={**patient, "0020|0011": "1"})
    files = sorted(folder.iterdir())
    random.Random(0).shuffle(files)
    for n, f in enumerate(files):
        f.rename(folder / f"1.2.826.0.1.3680043.2.1125.{1000 + n}")
    return series_uid
