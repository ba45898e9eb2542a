"""The PACS round trip against a real Orthanc (with its DICOMweb plugin), started here on free loopback ports from
its own configuration and storage folder, and stopped after.

A phantom MR series (written with a Frame of Reference) and pydicom's MR_small.dcm are uploaded; tools/pacs.py pulls
them over DICOMweb and over DIMSE, runs the prostate bundle (a tiny untrained network), stores SEG and RTSTRUCT;
queries then find them in the same study referring to their source series; a rerun stores nothing; an unreachable
endpoint and a refused store are named and leave the results on disk; a series that changes while being pulled is
skipped with its UID and the endpoint named.

Orthanc: ``apt-get install orthanc orthanc-dicomweb`` (``.ci/run`` does it in CI, where a missing Orthanc fails)."""

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import BUNDLE, REPO, phantom_series_image, write_series

pytest.importorskip("highdicom")
pytest.importorskip("pynetdicom")
pytest.importorskip("dicomweb_client")

from fedharmony.data.pacs import DicomWeb, Dimse, PacsError, SeriesRef, round_trip  # noqa: E402

USER, PASSWORD = "fedharmony", "not-a-secret"
CALLING_AE, ORTHANC_AE = "FEDHARMONY", "ORTHANCTEST"
PLUGIN_DIRS = ("/usr/share/orthanc/plugins", "/usr/lib/orthanc", "/usr/lib/x86_64-linux-gnu/orthanc")
REFUSE_LUA = """
function ReceivedInstanceFilter(dicom, origin, info)
  local f = io.open('{flag}', 'r')
  if f ~= nil then
    io.close(f)
    if dicom.Modality == 'RTSTRUCT' then return false end
  end
  return true
end
"""


def _free_ports(n):
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _dicomweb_plugin():
    for d in PLUGIN_DIRS:
        for name in ("libOrthancDicomWeb.so",):
            if os.path.exists(os.path.join(d, name)):
                return os.path.join(d, name)
    return None


def orthanc_binary():
    """(Orthanc binary, DICOMweb plugin) or None where either is missing."""
    binary = shutil.which("Orthanc") or next(
        (p for p in ("/usr/sbin/Orthanc", "/usr/bin/Orthanc") if os.path.exists(p)), None)
    plugin = _dicomweb_plugin()
    return (binary, plugin) if binary and plugin else None


@contextlib.contextmanager
def orthanc_server(base: Path, start_timeout: float = 30.0):
    """An Orthanc with its DICOMweb plugin on two free loopback ports (never 8042 / 4242), its configuration,
    index and storage under ``base``; HTTP basic authentication; DIMSE peers other than CALLING_AE at 127.0.0.1
    refused. Stopped (terminate, then kill) on exit; every wait bounded."""
    import requests

    binary, plugin = orthanc_binary()
    http, dicom = _free_ports(2)
    while http in (8042, 4242) or dicom in (8042, 4242):
        http, dicom = _free_ports(2)
    (base / "refuse.lua").write_text(REFUSE_LUA.format(flag=base / "refuse_rtstruct"))
    config = {
        "Name": "fedharmony-test", "StorageDirectory": str(base / "db"), "IndexDirectory": str(base / "db"),
        "HttpPort": http, "DicomPort": dicom, "DicomAet": ORTHANC_AE, "RemoteAccessAllowed": False,
        "AuthenticationEnabled": True, "RegisteredUsers": {USER: PASSWORD}, "HttpServerEnabled": True,
        "DicomServerEnabled": True, "DicomCheckCalledAet": True, "DicomAlwaysAllowStore": False,
        "DicomAlwaysAllowEcho": False, "DicomCheckModalityHost": True,
        "DicomModalities": {"fedharmony": [CALLING_AE, "127.0.0.1", 1]},
        "Plugins": [plugin], "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "StudiesMetadata": "Full",
                                          "SeriesMetadata": "Full"},
        "LuaScripts": [str(base / "refuse.lua")], "StableAge": 1, "ConcurrentJobs": 1, "HttpThreadsCount": 8,
        "SaveJobs": False,
    }
    (base / "orthanc.json").write_text(json.dumps(config, indent=2))
    log = (base / "orthanc.log").open("w")
    proc = subprocess.Popen([binary, str(base / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT, cwd=base)
    url = f"http://127.0.0.1:{http}"
    deadline = time.monotonic() + start_timeout
    try:
        while True:  # bounded: start_timeout
            try:
                if requests.get(f"{url}/system", auth=(USER, PASSWORD), timeout=2).ok:
                    break
            except requests.exceptions.ConnectionError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"Orthanc did not start on {url}: {(base / 'orthanc.log').read_text()[-2000:]}")
            time.sleep(0.2)
        yield {"url": url, "dicomweb": f"{url}/dicom-web", "dicom_port": dicom, "base": base,
               "auth": (USER, PASSWORD)}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    if orthanc_binary() is None:
        msg = ("Orthanc with its DICOMweb plugin is needed for the PACS tests: "
               "sudo apt-get install -y orthanc orthanc-dicomweb")
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(msg + " (CI: .ci/run installs it when run as root)")
        pytest.skip(msg)
    with orthanc_server(tmp_path_factory.mktemp("orthanc")) as server:
        yield server


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from fedharmony.bundle.networks import build_network

    path = tmp_path_factory.mktemp("model") / "model.pt"
    torch.save(build_network(str(BUNDLE), overrides={"base_features": 4}, seed=3).state_dict(), path)
    return path


def _upload(orthanc, files):
    import requests

    for f in files:
        r = requests.post(f"{orthanc['url']}/instances", data=Path(f).read_bytes(), auth=orthanc["auth"], timeout=30)
        r.raise_for_status()


def _phantom(tmp_path, name, slices=10, size=48):
    import pydicom

    folder = write_series(tmp_path / name, phantom_series_image(size=size, slices=slices), tags={"0010|0020": name})
    ds = pydicom.dcmread(next(folder.iterdir()), stop_before_pixels=True)
    return folder, SeriesRef(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID))


def _mr_small(tmp_path):
    import pydicom
    from pydicom.data import get_testdata_file

    src = get_testdata_file("MR_small.dcm")
    if not src:
        pytest.skip("this pydicom ships no MR_small.dcm")
    ds = pydicom.dcmread(src)
    return Path(src), SeriesRef(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID))


def _tool(*args, env=None, timeout=600):
    e = {**os.environ, "FEDHARMONY_PACS_USER": USER, "FEDHARMONY_PACS_PASSWORD": PASSWORD, **(env or {})}
    return subprocess.run([sys.executable, str(REPO / "tools" / "pacs.py"), *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=e)


def _results_in_archive(endpoint, ref):
    return {m: endpoint.find_series(study_uid=ref.study_uid, modality=m) for m in ("SEG", "RTSTRUCT")}


@pytest.mark.integration
@pytest.mark.parametrize("protocol", ["dicomweb", "dimse"])
def test_the_round_trip_stores_seg_and_rtstruct_in_the_source_study_once(orthanc, model, tmp_path, protocol):
    folder, phantom = _phantom(tmp_path, f"P_{protocol}")
    mr_file, mr = _mr_small(tmp_path)
    _upload(orthanc, [*folder.iterdir(), mr_file])
    web = DicomWeb(orthanc["dicomweb"], orthanc["auth"])
    where = (["--dicomweb", orthanc["dicomweb"]] if protocol == "dicomweb" else
             ["--dimse", f"127.0.0.1:{orthanc['dicom_port']}", "--called-ae", ORTHANC_AE, "--calling-ae", CALLING_AE])
    args = [*where, "--series", phantom.series_uid, mr.series_uid, "--output-format", "dicom_seg", "rtstruct",
            "--work", tmp_path / "work", "--timeout", 30, "--", "--ckpt_path", model, "--base_features", 4]
    if protocol == "dimse":  # MR_small may already carry results from the DICOMweb run: count from here
        before = {m: len(v) for m, v in _results_in_archive(web, mr).items()}
    else:
        before = {"SEG": 0, "RTSTRUCT": 0}
    res = _tool(*args)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    summary = json.loads((tmp_path / "work" / "pacs_summary.json").read_text())
    assert summary["done"] == 2 or (protocol == "dimse" and summary["done"] + summary["skipped"] == 2)
    for ref in (phantom,) + ((mr,) if protocol == "dicomweb" else ()):
        found = _results_in_archive(web, ref)
        assert len(found["SEG"]) == 1 and len(found["RTSTRUCT"]) == 1, found
        for modality, (s,) in found.items():
            assert s.study_uid == ref.study_uid
            assert web.results_for(ref.study_uid, ref.series_uid, [modality]) == {modality: s.series_uid}
        assert f"done series {ref.series_uid}" in res.stdout
    if protocol == "dimse":  # MR_small was segmented by the DICOMweb run already: found, not pulled again
        rec = {r["series_uid"]: r for r in summary["series"]}[mr.series_uid]
        if before["SEG"]:
            assert rec["status"] == "skipped" and "already in the archive" in rec["reason"]
    # a rerun (same work folder, then a fresh one) stores nothing new: no duplicate SEG / RTSTRUCT series
    for work in ("work", "fresh"):
        args[args.index("--work") + 1] = tmp_path / work
        again = _tool(*args)
        assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
        assert "stored SEG" not in again.stdout, again.stdout
        for ref in (phantom, mr):
            assert {m: len(v) for m, v in _results_in_archive(web, ref).items()} == {"SEG": 1, "RTSTRUCT": 1}


@pytest.mark.integration
def test_an_unreachable_archive_and_a_refused_store_keep_the_results_and_a_rerun_stores_only_what_is_missing(
        orthanc, model, tmp_path):
    dead_port = _free_ports(1)[0]
    res = _tool("--dicomweb", f"http://127.0.0.1:{dead_port}/dicom-web", "--series", "1.2.3", "--timeout", 5)
    assert res.returncode == 2 and f"DICOMweb http://127.0.0.1:{dead_port}/dicom-web is unreachable" in res.stderr
    res = _tool("--dimse", f"127.0.0.1:{dead_port}", "--called-ae", "NOBODY", "--series", "1.2.3", "--timeout", 5)
    assert res.returncode == 2 and f"DIMSE NOBODY@127.0.0.1:{dead_port}" in res.stderr

    folder, ref = _phantom(tmp_path, "P_fail")
    _upload(orthanc, folder.iterdir())
    web = DicomWeb(orthanc["dicomweb"], orthanc["auth"], timeout=30)
    bundle_args = ["--ckpt_path", model, "--base_features", 4]
    work = tmp_path / "work"
    # 1. the archive goes away after the pull: the results are made, kept, and reported not stored
    dead = DicomWeb(f"http://127.0.0.1:{dead_port}/dicom-web", timeout=5)
    web.store = dead.store
    summary = round_trip(web, [ref], work, BUNDLE, ["dicom_seg", "rtstruct"], bundle_args)
    assert f"DICOMweb http://127.0.0.1:{dead_port}/dicom-web is unreachable" in summary["error"]
    (rec,) = summary["series"]
    assert rec["status"] == "skipped" and ref.series_uid in rec["reason"] and "kept on disk" in rec["reason"]
    assert all(Path(v["path"]).is_file() and not v["stored"] for v in rec["results"].values())
    assert len(summary["results_not_stored"]) == 2 and not summary["results_stored"]
    # 2. the archive refuses the RTSTRUCT (an Orthanc filter): the SEG is stored, the RTSTRUCT named as not
    web = DicomWeb(orthanc["dicomweb"], orthanc["auth"], timeout=30)
    (orthanc["base"] / "refuse_rtstruct").write_text("")
    try:
        summary = round_trip(web, [ref], work, BUNDLE, ["dicom_seg", "rtstruct"], bundle_args)
    finally:
        (orthanc["base"] / "refuse_rtstruct").unlink()
    (rec,) = summary["series"]
    assert rec["results"]["dicom_seg"]["stored"] and not rec["results"]["rtstruct"]["stored"]
    assert "refused" in rec["reason"] and ref.series_uid in rec["reason"] and orthanc["dicomweb"] in rec["reason"]
    assert not list((work / "run-2").glob("input/*"))  # nothing pulled or run again: the results were on disk
    # 3. rerun: only the RTSTRUCT is stored; one SEG and one RTSTRUCT in the study
    summary = round_trip(web, [ref], work, BUNDLE, ["dicom_seg", "rtstruct"], bundle_args)
    (rec,) = summary["series"]
    assert rec["status"] == "done" and all(v["stored"] for v in rec["results"].values())
    assert {m: len(v) for m, v in _results_in_archive(web, ref).items()} == {"SEG": 1, "RTSTRUCT": 1}


@pytest.mark.integration
@pytest.mark.parametrize("protocol", ["dicomweb", "dimse"])
def test_a_series_that_changes_while_being_pulled_is_skipped_with_its_uid_and_the_endpoint_named(
        orthanc, tmp_path, protocol):
    folder, ref = _phantom(tmp_path, f"P_change_{protocol}", slices=4, size=16)
    files = sorted(folder.iterdir())
    _upload(orthanc, files[:3])
    endpoint = (DicomWeb(orthanc["dicomweb"], orthanc["auth"], timeout=30) if protocol == "dicomweb" else
                Dimse("127.0.0.1", orthanc["dicom_port"], ORTHANC_AE, CALLING_AE, timeout=30))
    pull = endpoint.pull

    def pull_while_a_slice_arrives(r, dest):
        out = pull(r, dest)
        _upload(orthanc, [files[3]])  # the scanner sends one more slice meanwhile
        return out

    endpoint.pull = pull_while_a_slice_arrives
    summary = round_trip(endpoint, [ref], tmp_path / "work", BUNDLE, ["dicom_seg"], ["--ckpt_path", "unused"])
    (rec,) = summary["series"]
    assert rec["status"] == "skipped" and not rec["results"]
    assert f"series {ref.series_uid} at {endpoint.name} changed while being pulled" in rec["reason"]
    assert "3 instances before, 3 pulled, 4 after" in rec["reason"]


def test_credentials_come_from_a_file_or_the_environment_never_the_command_line(tmp_path, monkeypatch):
    from fedharmony.data.pacs import load_credentials

    for var in ("FEDHARMONY_PACS_USER", "FEDHARMONY_PACS_PASSWORD", "FEDHARMONY_PACS_CREDENTIALS"):
        monkeypatch.delenv(var, raising=False)
    assert load_credentials() is None
    monkeypatch.setenv("FEDHARMONY_PACS_USER", "u")
    monkeypatch.setenv("FEDHARMONY_PACS_PASSWORD", "p:w")
    assert load_credentials() == ("u", "p:w")
    (tmp_path / "c").write_text("alice:s3cr:et\n")
    assert load_credentials(str(tmp_path / "c")) == ("alice", "s3cr:et")
    (tmp_path / "j").write_text('{"username": "bob", "password": "x"}')
    monkeypatch.setenv("FEDHARMONY_PACS_CREDENTIALS", str(tmp_path / "j"))
    assert load_credentials() == ("bob", "x")
    (tmp_path / "bad").write_text("no-colon")
    with pytest.raises(PacsError, match="user:password"):
        load_credentials(str(tmp_path / "bad"))
    help_text = subprocess.run([sys.executable, str(REPO / "tools" / "pacs.py"), "--help"], capture_output=True,
                               text=True, timeout=120).stdout
    assert "--password" not in help_text and "--credentials-file" in help_text


@pytest.mark.integration
def test_wrong_credentials_are_named_as_a_refusal_by_the_endpoint(orthanc):
    with pytest.raises(PacsError, match=f"DICOMweb {orthanc['dicomweb']} refused a series query .*HTTP 401"):
        DicomWeb(orthanc["dicomweb"], (USER, "wrong"), timeout=10).find_series(modality="MR")
    with pytest.raises(PacsError, match=f"DIMSE NOTORTHANC@127.0.0.1:{orthanc['dicom_port']} rejected the association"):
        Dimse("127.0.0.1", orthanc["dicom_port"], "NOTORTHANC", CALLING_AE, timeout=10).find_series(modality="MR")

