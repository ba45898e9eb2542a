"""A PACS round trip: pull series from an archive, run the bundle on them, store the SEG / RTSTRUCT back.

Two kinds of endpoint, one interface (:class:`DicomWeb`, :class:`Dimse`):

* DICOMweb (dicomweb-client): QIDO-RS to find, WADO-RS to pull, STOW-RS to store. Credentials come from the
  environment (``FEDHARMONY_PACS_USER`` / ``FEDHARMONY_PACS_PASSWORD``) or a file (``user:password`` on one line,
  or JSON ``{"username": ..., "password": ...}``), never from the command line; HTTPS is checked against the
  system's CAs or a CA bundle given.
* DIMSE (pynetdicom): C-FIND to find, C-GET to pull (no port of ours to open: the peer sends the instances back on
  the same association), C-STORE to store; AE titles, host and port given.

:func:`round_trip` does the work for a list of series: for each, look in the archive for results already there
(a SEG / RTSTRUCT series of the same study that refers to the source series: then nothing is pulled, run or
stored again), pull the series into ``<work>/run-N/input/<series UID>`` checking that it did not change while
being pulled (its instance UIDs before, as pulled, and after), run the bundle once on everything pulled
(``python -m monai.bundle run`` of the bundle's inference config with ``output_format``), and store each result
unless an instance with its SOP Instance UID is already there. What happened to each series is kept in
``<work>/pacs_summary.json``, rewritten after every step: results on disk stay there when a store fails or the
archive goes away, and a rerun with the same ``--work`` stores only what is missing.

Every network call has a timeout and every loop a bound (``max_series``, the instances of one series).
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

logger = logging.getLogger(__name__)

SUMMARY_NAME = "pacs_summary.json"
RESULT_MODALITY = {"dicom_seg": "SEG", "rtstruct": "RTSTRUCT"}
USER_ENV, PASSWORD_ENV = "FEDHARMONY_PACS_USER", "FEDHARMONY_PACS_PASSWORD"
CREDENTIALS_ENV = "FEDHARMONY_PACS_CREDENTIALS"
ALREADY = "results already in the archive"  # a skip that is no failure: a rerun finds what an earlier run stored
MAX_SERIES = 500  # a query that finds more is refused: narrow it (dates, modality) or raise max_series


class PacsError(RuntimeError):
    """A PACS operation failed; the message names the endpoint and, where there is one, the series."""


@dataclass
class SeriesRef:
    study_uid: str
    series_uid: str
    modality: str = ""
    description: str = ""


def load_credentials(path: Optional[str] = None) -> Optional[Tuple[str, str]]:
    """(user, password) from ``path`` (or the file named by $FEDHARMONY_PACS_CREDENTIALS), else from
    $FEDHARMONY_PACS_USER / $FEDHARMONY_PACS_PASSWORD, else None."""
    path = path or os.environ.get(CREDENTIALS_ENV)
    if path:
        text = Path(path).read_text().strip()
        if text.startswith("{"):
            d = json.loads(text)
            return str(d["username"]), str(d["password"])
        user, sep, password = text.splitlines()[0].partition(":")
        if not sep:
            raise PacsError(f"credentials file {path}: expected 'user:password' or JSON with username and password")
        return user, password
    if os.environ.get(USER_ENV):
        return os.environ[USER_ENV], os.environ.get(PASSWORD_ENV, "")
    return None


def _referenced_series(ds) -> set:
    """Every SeriesInstanceUID inside ``ds``'s sequences (a SEG's ReferencedSeriesSequence, an RTSTRUCT's
    RTReferencedSeriesSequence ...): the series it refers to."""
    found, stack = set(), [ds]
    while stack:
        item = stack.pop()
        for elem in item:
            if elem.VR == "SQ":
                for sub in elem.value:
                    if "SeriesInstanceUID" in sub:
                        found.add(str(sub.SeriesInstanceUID))
                    stack.append(sub)
    return found


# ----------------------------------------------------------------------------------------------------- DICOMweb
class DicomWeb:
    """A DICOMweb endpoint (QIDO-RS / WADO-RS / STOW-RS), e.g. ``https://pacs.example.org/dicom-web``."""

    def __init__(self, url: str, credentials: Optional[Tuple[str, str]] = None, ca_bundle: Optional[str] = None,
                 timeout: float = 60.0, attempts: int = 2):
        import requests
        from dicomweb_client import DICOMwebClient

        self.url = url.rstrip("/")
        self.name = f"DICOMweb {self.url}"
        session = requests.Session()
        if credentials:
            session.auth = credentials
        if ca_bundle:
            session.verify = ca_bundle
        # chunk_size: a STOW-RS body larger than this goes out with chunked transfer encoding, which some archives
        # (Orthanc 1.10 with its DICOMweb plugin 1.7) answer with 200 without storing anything; results are a few MB
        self.client = DICOMwebClient(self.url, session=session, timeout=timeout, chunk_size=1 << 30)
        # bounded: ``attempts`` tries per request (dicomweb-client's default is 5 with waits of up to 16 s)
        self.client.set_http_retry_params(retry=attempts > 1, max_attempts=max(1, attempts),
                                          wait_exponential_multiplier=250)

    def _call(self, what: str, fn, *args, **kwargs):
        import requests

        try:
            return fn(*args, **kwargs)
        except requests.exceptions.SSLError as e:
            raise PacsError(f"{self.name}: the TLS certificate check failed ({what}); give the archive's CA as "
                            f"--ca-bundle: {e}") from e
        except requests.exceptions.ConnectionError as e:
            raise PacsError(f"{self.name} is unreachable ({what}): {type(e).__name__}") from e
        except requests.exceptions.Timeout as e:
            raise PacsError(f"{self.name} did not answer in time ({what})") from e
        except requests.exceptions.HTTPError as e:
            code = e.response.status_code if e.response is not None else "?"
            raise PacsError(f"{self.name} refused {what}: HTTP {code}") from e

    @staticmethod
    def _value(rec: dict, tag: str) -> str:
        v = rec.get(tag, {}).get("Value", [""])
        return str(v[0]) if v else ""

    def find_series(self, study_uid: Optional[str] = None, series_uid: Optional[str] = None, date: Optional[str] = None,
                    modality: Optional[str] = None, limit: int = MAX_SERIES) -> List[SeriesRef]:
        filters: Dict[str, Any] = {}
        if series_uid:
            filters["SeriesInstanceUID"] = series_uid
        if date:
            filters["StudyDate"] = date
        if modality:
            filters["Modality"] = modality
        recs = self._call("a series query (QIDO-RS)", self.client.search_for_series, study_instance_uid=study_uid,
                          search_filters=filters, limit=limit + 1,
                          fields=["StudyInstanceUID", "SeriesInstanceUID", "Modality", "SeriesDescription"])
        return [SeriesRef(self._value(r, "0020000D"), self._value(r, "0020000E"), self._value(r, "00080060"),
                          self._value(r, "0008103E")) for r in recs]

    def instance_uids(self, study_uid: str, series_uid: Optional[str] = None, sop_uid: Optional[str] = None,
                      limit: int = 10000) -> set:
        filters = {"SOPInstanceUID": sop_uid} if sop_uid else {}
        recs = self._call(f"an instance query (QIDO-RS) in series {series_uid or '*'}",
                          self.client.search_for_instances,
                          study_instance_uid=study_uid, series_instance_uid=series_uid, search_filters=filters,
                          limit=limit, fields=["SOPInstanceUID"])
        return {self._value(r, "00080018") for r in recs}

    def pull(self, ref: SeriesRef, dest: Path) -> List[Path]:
        datasets = self._call(f"series {ref.series_uid} (WADO-RS)", self.client.retrieve_series, ref.study_uid,
                              ref.series_uid)
        dest.mkdir(parents=True, exist_ok=True)
        out = []
        for ds in datasets:
            path = dest / f"{ds.SOPInstanceUID}.dcm"
            ds.save_as(path, enforce_file_format=True)
            out.append(path)
        return out

    def results_for(self, study_uid: str, source_series: str, modalities: Iterable[str]) -> Dict[str, str]:
        """{modality: result series UID} for the SEG / RTSTRUCT series of ``study_uid`` that refer to
        ``source_series``."""
        import pydicom

        found = {}
        for modality in modalities:
            for ref in self.find_series(study_uid=study_uid, modality=modality):
                meta = self._call(f"series {ref.series_uid} metadata (WADO-RS)", self.client.retrieve_series_metadata,
                                  study_uid, ref.series_uid)
                for m in meta[:1]:
                    ds = pydicom.Dataset.from_json(m, bulk_data_uri_handler=lambda *a: b"")
                    if source_series in _referenced_series(ds):
                        found[modality] = ref.series_uid
        return found

    def store(self, files: Sequence[Path], ref: SeriesRef) -> None:
        import pydicom

        datasets = [pydicom.dcmread(f) for f in files]
        resp = self._call(f"the results of series {ref.series_uid} (STOW-RS)", self.client.store_instances, datasets)
        failed = resp.get("FailedSOPSequence") if resp is not None else None
        if failed:
            reasons = {str(getattr(item, "FailureReason", "?")) for item in failed}
            raise PacsError(f"{self.name} refused the results of series {ref.series_uid} (STOW-RS failure reason "
                            f"{', '.join(sorted(reasons))})")


# ----------------------------------------------------------------------------------------------------- DIMSE
class Dimse:
    """A DIMSE peer: ``called_ae`` at ``host:port``; we are ``calling_ae`` (which the peer must know for C-GET)."""

    def __init__(self, host: str, port: int, called_ae: str, calling_ae: str = "FEDHARMONY", timeout: float = 60.0):
        self.host, self.port, self.called_ae, self.calling_ae = host, int(port), called_ae, calling_ae
        self.timeout = timeout
        self.name = f"DIMSE {called_ae}@{host}:{port}"

    def _ae(self):
        from pynetdicom import AE

        ae = AE(ae_title=self.calling_ae)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout
        ae.connection_timeout = min(self.timeout, 10)
        return ae

    def _associate(self, ae, what: str, **kwargs):
        assoc = ae.associate(self.host, self.port, ae_title=self.called_ae, **kwargs)
        if not assoc.is_established:
            why = "rejected the association" if assoc.is_rejected else "is unreachable or aborted the association"
            raise PacsError(f"{self.name} {why} ({what})")
        return assoc

    def _find(self, identifier, what: str, limit: int) -> list:
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as FIND

        ae = self._ae()
        ae.add_requested_context(FIND)
        assoc = self._associate(ae, what)
        out = []
        try:
            for status, ds in assoc.send_c_find(identifier, FIND):
                if not status:
                    raise PacsError(f"{self.name}: no answer to {what} (timeout or aborted)")
                if status.Status in (0xFF00, 0xFF01):
                    out.append(ds)
                    if len(out) > limit:
                        assoc.send_c_cancel(1, None)  # bounded: more than asked for is refused below
                        break
                elif status.Status != 0x0000:
                    raise PacsError(f"{self.name} refused {what}: C-FIND status 0x{status.Status:04X}")
        finally:
            assoc.release()
        return out

    def find_series(self, study_uid: Optional[str] = None, series_uid: Optional[str] = None, date: Optional[str] = None,
                    modality: Optional[str] = None, limit: int = MAX_SERIES) -> List[SeriesRef]:
        from pydicom import Dataset

        q = Dataset()
        q.QueryRetrieveLevel = "SERIES"
        q.StudyInstanceUID = study_uid or ""
        q.SeriesInstanceUID = series_uid or ""
        q.Modality = modality or ""
        q.SeriesDescription = ""
        if date:
            q.StudyDate = date
        if not study_uid and not series_uid:  # study root: a series query without a study is a two-level search
            studies = Dataset()
            studies.QueryRetrieveLevel = "STUDY"
            studies.StudyInstanceUID = ""
            studies.StudyDate = date or ""
            studies.ModalitiesInStudy = modality or ""
            found = []
            for st in self._find(studies, "a study query (C-FIND)", limit):
                found += self.find_series(study_uid=str(st.StudyInstanceUID), modality=modality, limit=limit)
            return found[:limit + 1]
        return [SeriesRef(str(d.StudyInstanceUID), str(d.SeriesInstanceUID), str(d.get("Modality", "")),
                          str(d.get("SeriesDescription", "")))
                for d in self._find(q, f"a series query (C-FIND) {series_uid or ''}".strip(), limit)]

    def instance_uids(self, study_uid: str, series_uid: Optional[str] = None, sop_uid: Optional[str] = None,
                      limit: int = 10000) -> set:
        from pydicom import Dataset

        q = Dataset()
        q.QueryRetrieveLevel = "IMAGE"
        q.StudyInstanceUID = study_uid
        q.SeriesInstanceUID = series_uid or ""
        q.SOPInstanceUID = sop_uid or ""
        what = f"an instance query (C-FIND) in series {series_uid or '*'}"
        return {str(d.SOPInstanceUID) for d in self._find(q, what, limit)}

    def pull(self, ref: SeriesRef, dest: Path) -> List[Path]:
        from pydicom import Dataset
        from pynetdicom import build_role, evt
        from pynetdicom.sop_class import (EnhancedMRImageStorage, MRImageStorage, CTImageStorage, RTStructureSetStorage,
                                          SegmentationStorage, StudyRootQueryRetrieveInformationModelGet as GET)

        dest.mkdir(parents=True, exist_ok=True)
        out: List[Path] = []

        def on_store(event):
            ds = event.dataset
            ds.file_meta = event.file_meta
            path = dest / f"{ds.SOPInstanceUID}.dcm"
            ds.save_as(path, enforce_file_format=True)
            out.append(path)
            return 0x0000

        ae = self._ae()
        ae.add_requested_context(GET)
        storage = [MRImageStorage, EnhancedMRImageStorage, CTImageStorage, SegmentationStorage, RTStructureSetStorage]
        for cx in storage:
            ae.add_requested_context(cx)
        roles = [build_role(cx, scp_role=True) for cx in storage]
        assoc = self._associate(ae, f"series {ref.series_uid} (C-GET)", ext_neg=roles,
                                evt_handlers=[(evt.EVT_C_STORE, on_store)])
        q = Dataset()
        q.QueryRetrieveLevel = "SERIES"
        q.StudyInstanceUID, q.SeriesInstanceUID = ref.study_uid, ref.series_uid
        try:
            for status, _ in assoc.send_c_get(q, GET):
                if not status:
                    raise PacsError(f"{self.name}: no answer while pulling series {ref.series_uid} (C-GET timeout)")
                if status.Status not in (0x0000, 0xFF00):
                    raise PacsError(f"{self.name} failed to send series {ref.series_uid}: C-GET status "
                                    f"0x{status.Status:04X}")
        finally:
            assoc.release()
        return out

    def results_for(self, study_uid: str, source_series: str, modalities: Iterable[str]) -> Dict[str, str]:
        import pydicom

        found = {}
        for modality in modalities:
            for ref in self.find_series(study_uid=study_uid, modality=modality):
                with tempfile.TemporaryDirectory() as tmp:
                    files = self.pull(ref, Path(tmp))
                    first = pydicom.dcmread(files[0], stop_before_pixels=True) if files else None
                    if first is not None and source_series in _referenced_series(first):
                        found[modality] = ref.series_uid
        return found

    def store(self, files: Sequence[Path], ref: SeriesRef) -> None:
        import pydicom

        datasets = [pydicom.dcmread(f) for f in files]
        ae = self._ae()
        for ds in datasets:
            ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
        assoc = self._associate(ae, f"storing the results of series {ref.series_uid} (C-STORE)")
        try:
            for f, ds in zip(files, datasets):
                status = assoc.send_c_store(ds)
                if not status:
                    raise PacsError(f"{self.name}: no answer storing {f.name} for series {ref.series_uid}")
                if status.Status not in (0x0000, 0xB000, 0xB007, 0xB006):
                    raise PacsError(f"{self.name} refused {f.name} (the result of series {ref.series_uid}): C-STORE "
                                    f"status 0x{status.Status:04X}")
        finally:
            assoc.release()


# ----------------------------------------------------------------------------------------------------- round trip
def bundle_command(bundle: Path, input_dir: Path, output_dir: Path, output_format: Sequence[str],
                   extra: Sequence[str] = ()) -> List[str]:
    """``python -m monai.bundle run`` of ``bundle``'s configs/inference.json on ``input_dir``."""
    return [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(bundle / "configs" / "inference.json"),
            "--bundle_root", str(bundle), "--dataset_dir", str(input_dir), "--output_dir", str(output_dir),
            "--output_format", json.dumps(list(output_format)), "--allow_skipped", "True", *map(str, extra)]


@dataclass
class SeriesRecord:
    study_uid: str
    series_uid: str
    status: str = "pending"  # pending, done (results stored), skipped
    reason: str = ""
    results: Dict[str, Dict[str, Any]] = field(default_factory=dict)  # format -> {path, sop_instance_uid, stored}
    gland_volume_ml: Optional[float] = None
    needs_review: Optional[bool] = None
    seconds: Dict[str, float] = field(default_factory=dict)


class RoundTrip:
    """The state of a round trip in ``work`` (``pacs_summary.json``), kept across reruns."""

    def __init__(self, work: Path, endpoint_name: str):
        self.work = Path(work)
        self.work.mkdir(parents=True, exist_ok=True)
        self.path = self.work / SUMMARY_NAME
        self.endpoint = endpoint_name
        self.series: Dict[str, SeriesRecord] = {}
        if self.path.exists():
            for rec in json.loads(self.path.read_text()).get("series", []):
                self.series[rec["series_uid"]] = SeriesRecord(**rec)

    def save(self) -> dict:
        recs = list(self.series.values())
        stored = [f"{r.series_uid} {fmt}" for r in recs for fmt, v in r.results.items() if v.get("stored")]
        unstored = [f"{r.series_uid} {fmt}" for r in recs for fmt, v in r.results.items() if not v.get("stored")]
        summary = {"endpoint": self.endpoint, "series": [asdict(r) for r in recs],
                   "done": sum(r.status == "done" for r in recs), "skipped": sum(r.status == "skipped" for r in recs),
                   "failed": sum(r.status == "skipped" and not r.reason.startswith(ALREADY) for r in recs),
                   "results_stored": stored, "results_not_stored": unstored,
                   "updated": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
        os.replace(tmp, self.path)
        return summary


def _say(msg: str) -> None:
    logger.info(msg)
    print(msg, flush=True)


def round_trip(endpoint, refs: Sequence[SeriesRef], work: Path, bundle: Path,
               output_format: Sequence[str] = ("dicom_seg",),
               bundle_args: Sequence[str] = (), run_timeout: float = 3600.0, max_series: int = MAX_SERIES) -> dict:
    """Pull ``refs`` from ``endpoint``, segment them with ``bundle``, store the results in their studies.

    Returns the summary (also in ``work/pacs_summary.json``). A :class:`PacsError` from the endpoint while
    finding or pulling marks that series skipped (the others go on) unless the endpoint is unreachable, which ends
    the run after saving the summary; results already on disk are kept and stored by a rerun."""
    fmts = [f for f in output_format if f in RESULT_MODALITY]
    if not fmts:
        raise ValueError(f"output_format {list(output_format)}: a PACS round trip stores dicom_seg and / or rtstruct")
    if len(refs) > max_series:
        raise PacsError(f"{endpoint.name}: {len(refs)} series selected, more than max_series={max_series}")
    state = RoundTrip(work, endpoint.name)
    run_no = 1 + sum(1 for p in state.work.glob("run-*") if p.is_dir())
    run_dir = state.work / f"run-{run_no}"
    pulled: Dict[str, Tuple[SeriesRef, Path]] = {}
    fatal: Optional[PacsError] = None

    def unreachable(e: PacsError) -> bool:
        return "unreachable" in str(e) or "did not answer" in str(e) or "no answer" in str(e)

    for ref in refs:
        rec = state.series.setdefault(ref.series_uid, SeriesRecord(ref.study_uid, ref.series_uid))
        on_disk = {f for f, v in rec.results.items() if Path(v["path"]).is_file()}
        if set(fmts) <= on_disk:
            continue  # results made by an earlier run: only the store is left
        try:
            there = endpoint.results_for(ref.study_uid, ref.series_uid, [RESULT_MODALITY[f] for f in fmts])
            if len(there) == len(fmts):
                where = ", ".join(f"{m} series {u}" for m, u in there.items())
                rec.status, rec.reason = "skipped", f"{ALREADY} ({where})"
                _say(f"skipped series {ref.series_uid}: {rec.reason}")
                continue
            t0 = time.monotonic()
            before = endpoint.instance_uids(ref.study_uid, ref.series_uid)
            if not before:
                raise PacsError(f"{endpoint.name} has no instance of series {ref.series_uid}")
            dest = run_dir / "input" / ref.series_uid
            files = endpoint.pull(ref, dest)
            import pydicom

            got = {str(pydicom.dcmread(f, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).SOPInstanceUID)
                   for f in files}
            after = endpoint.instance_uids(ref.study_uid, ref.series_uid)
            if not (before == got == after):
                raise PacsError(f"series {ref.series_uid} at {endpoint.name} changed while being pulled: {len(before)} "
                                f"instances before, {len(got)} pulled, {len(after)} after; pull it again later")
            rec.seconds["pull"] = round(time.monotonic() - t0, 3)
            pulled[ref.series_uid] = (ref, dest)
            _say(f"pulled series {ref.series_uid} ({len(files)} instances) from {endpoint.name}")
        except PacsError as e:
            rec.status, rec.reason = "skipped", str(e)
            _say(f"skipped series {ref.series_uid}: {e}")
            if unreachable(e):
                fatal = e
                break
    state.save()

    if pulled and fatal is None:
        out_dir = run_dir / "output"
        t0 = time.monotonic()
        cmd = bundle_command(bundle, run_dir / "input", out_dir, fmts, bundle_args)
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=run_timeout, cwd=run_dir)
        seconds = time.monotonic() - t0
        (run_dir / "bundle.log").write_text(res.stdout + res.stderr)
        try:
            summary = json.loads((out_dir / "inference_summary.json").read_text())
        except FileNotFoundError:
            summary = {"inputs": [], "skipped_inputs": []}
        by_series = {Path(r["input"]).name: r for r in summary.get("inputs", [])}
        skipped = {Path(r["input"]).name: r.get("reason", "") for r in summary.get("skipped_inputs", [])}
        skipped.update({Path(r["input"]).name: f"not selected by the bundle's series_filter: {r.get('reason', '')}"
                        for r in summary.get("not_selected_inputs", [])})
        for uid, (ref, dest) in pulled.items():
            rec = state.series[uid]
            r = by_series.get(uid)
            if r is None:
                rec.status = "skipped"
                why = skipped.get(uid) or f"exit status {res.returncode}, see {run_dir / 'bundle.log'}"
                rec.reason = f"the bundle did not segment it: {why}"
                _say(f"skipped series {uid}: {rec.reason}")
                continue
            rec.seconds["inference"] = round(seconds / len(pulled), 3)
            rec.gland_volume_ml, rec.needs_review = r.get("gland_volume_ml"), r.get("needs_review")
            for fmt in fmts:
                if r.get(fmt):
                    import pydicom

                    sop = pydicom.dcmread(r[fmt], stop_before_pixels=True,
                                          specific_tags=["SOPInstanceUID"]).SOPInstanceUID
                    rec.results[fmt] = {"path": r[fmt], "sop_instance_uid": str(sop), "stored": False}
        state.save()

    # store every result on disk not yet stored (this run's and an earlier run's)
    for ref in refs:
        rec = state.series[ref.series_uid]
        todo = [f for f in fmts if f in rec.results and not rec.results[f].get("stored")]
        if fatal is not None or not todo:
            if rec.results and all(v.get("stored") for v in rec.results.values()) and rec.status != "skipped":
                rec.status = "done"
            continue
        t0 = time.monotonic()
        try:
            for fmt in todo:
                res = rec.results[fmt]
                if endpoint.instance_uids(ref.study_uid, None, sop_uid=res["sop_instance_uid"]):
                    res["stored"] = True  # stored before (e.g. the answer was lost): not again
                    res["note"] = "already in the archive"
                    continue
                endpoint.store([Path(res["path"])], ref)
                if not endpoint.instance_uids(ref.study_uid, None, sop_uid=res["sop_instance_uid"]):
                    raise PacsError(f"{endpoint.name} refused the {RESULT_MODALITY[fmt]} of series {ref.series_uid}: "
                                    f"the store was answered, but the archive does not have instance "
                                    f"{res['sop_instance_uid']} (filtered or dropped)")
                res["stored"] = True
                state.save()
            rec.status, rec.reason = "done", ""
            rec.seconds["store"] = round(time.monotonic() - t0, 3)
            _say(f"done series {ref.series_uid}: stored {', '.join(RESULT_MODALITY[f] for f in todo)} in study "
                 f"{ref.study_uid} at {endpoint.name}")
        except PacsError as e:
            rec.status, rec.reason = "skipped", f"results kept on disk, not stored: {e}"
            _say(f"skipped series {ref.series_uid}: {rec.reason}")
            if unreachable(e):
                fatal = e
        state.save()
    summary = state.save()
    if fatal is not None:
        summary["error"] = str(fatal)
    return summary


def select_series(endpoint, study_uids: Sequence[str] = (), series_uids: Sequence[str] = (), date: Optional[str] = None,
                  modality: Optional[str] = None, max_series: int = MAX_SERIES) -> List[SeriesRef]:
    """The series to segment: every series of the given studies (of ``modality`` if given), the given series, or
    those a query by study date (``20250101`` or a range ``20250101-20250131``) and modality finds."""
    refs: List[SeriesRef] = []
    for s in series_uids:
        found = endpoint.find_series(series_uid=s, limit=1)
        if not found:
            raise PacsError(f"{endpoint.name} has no series {s}")
        refs += found[:1]
    for st in study_uids:
        found = endpoint.find_series(study_uid=st, modality=modality, limit=max_series)
        refs += [r for r in found if r.modality not in RESULT_MODALITY.values()]
    if date or (modality and not study_uids and not series_uids):
        refs += [r for r in endpoint.find_series(date=date, modality=modality, limit=max_series)
                 if r.modality not in RESULT_MODALITY.values()]
    unique = list({r.series_uid: r for r in refs}.values())
    if len(unique) > max_series:
        raise PacsError(f"{endpoint.name}: the selection finds {len(unique)} series, more than max_series={max_series}")
    return unique
