"""Inference over a folder as a hospital hands it over: every usable input processed, every other one named.

A MONAI bundle's inference is a ``SupervisedEvaluator`` over a ``DataLoader``. One bad file (corrupt,
a 4-D series, a volume too small for the network, a file that is no image) raises inside the loop and
stops the run: the files after it are never processed, and the message often names no file. The
pieces here keep the run going and account for every input:

* :class:`ScreenedDataset` applies the preprocessing item by item; an item whose loading or
  preprocessing fails becomes a *skip record* (the input and the reason) instead of an exception.
* :func:`screened_collate` collates the good items of a batch and carries the skip records beside them.
* :class:`FolderEvaluator` is MONAI's ``SupervisedEvaluator`` that records those skip records, and
  any item whose inference or postprocessing (inverse transforms, saving) fails, then goes on.
* :class:`SaveMaskd` writes each mask as NIfTI with its input's geometry, atomically, never over an
  existing file unless told to.
* :class:`InferenceSummary` collects what happened, logs it, writes ``inference_summary.json`` (and
  ``inference_summary.csv``: one row per input with its gland volume and review flag, from
  :class:`fedharmony.bundle.results.SaveResultsd`) beside the outputs and, by default, ends the run with exit status 1 when anything was skipped. Inputs the
  bundle does not take (a CT series for an MR bundle, a localizer: ``status`` "not selected") and notes
  (a DICOMDIR read) are listed too but are no error; a DICOM input's series (patient, study and series
  UIDs, what was dropped from it) is listed with it.

In a bundle config (``batch_size`` may be anything; the inputs come from
:func:`fedharmony.data.images.find_inputs`, which names what it cannot use)::

    "summary": {"_target_": "fedharmony.bundle.folder_inference.InferenceSummary", "input_dir": "@dataset_dir",
                "output_dir": "@output_dir", "unusable": "$@input_scan[1]", "allow_skipped": "@allow_skipped"},
    "dataset": {"_target_": "fedharmony.bundle.folder_inference.ScreenedDataset", "data": "@datalist",
                "transform": "@preprocessing"},
    "dataloader": {"_target_": "DataLoader", ..., "collate_fn": "$fedharmony.bundle.folder_inference.screened_collate"},
    "evaluator": {"_target_": "fedharmony.bundle.folder_inference.FolderEvaluator", "summary": "@summary", ...},
    "run": ["$@summary.begin(@datalist)", "$@evaluator.run()", "$@summary.finish()"]
"""

from __future__ import annotations

import csv
import datetime
import io
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, Hashable, List, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from monai.data import MetaTensor, list_data_collate
from monai.engines import SupervisedEvaluator
from monai.transforms import MapTransform

from fedharmony.core.files import atomic_write_text

__all__ = ["SKIPPED", "InputRejected", "ScreenedDataset", "screened_collate", "FolderEvaluator", "SaveMaskd",
           "mask_and_affine", "InferenceSummary", "input_of", "refuse_existing", "OUTPUT_FORMATS", "parse_output_format"]

logger = logging.getLogger("fedharmony.inference")

SKIPPED = "__skipped__"  # key of the skip records in an item or a batch
SUMMARY_NAME = "inference_summary.json"
SUMMARY_CSV = "inference_summary.csv"  # one row per input: status, gland volume, review flag, output paths
PREPROCESS_SECONDS = "preprocess_s"  # per item, from ScreenedDataset: loading and preprocessing time
SERIES = "series"  # an input's DICOM series record (fedharmony.data.images.find_inputs), for the summary only
NOT_SELECTED, NOTE = "not selected", "note"  # statuses of an unusable record that are no error
OUTPUT_FORMATS = ("nifti", "dicom_seg", "rtstruct")  # what a run writes per prediction (bundle/results.py)


def parse_output_format(value: Union[str, Sequence[str], None]) -> List[str]:
    """``"nifti"``, ``"dicom_seg"``, ``"rtstruct"``, a list of them, or their comma-separated text -> the list.

    Raises:
        ValueError: an unknown format (the message lists the known ones).
    """
    if value is None or value == "":
        return ["nifti"]
    items = [v.strip() for v in value.split(",")] if isinstance(value, str) else [str(v).strip() for v in value]
    unknown = [v for v in items if v not in OUTPUT_FORMATS]
    if unknown or not items:
        raise ValueError(f"output_format {value!r}: unknown {unknown}; use one or a list of {list(OUTPUT_FORMATS)}")
    return list(dict.fromkeys(items))


class InputRejected(ValueError):
    """An input the bundle cannot use as it is (the message says why and, where there is one, what to set)."""


def input_of(item: Mapping[Hashable, Any], key: str = "image") -> str:
    """The file or folder an item came from: its ``input`` entry, else the path in its ``key``."""
    if "input" in item:
        return str(item["input"])
    value = item.get(key)
    if isinstance(value, MetaTensor):
        return str(value.meta.get("filename_or_obj", "?"))
    return str(value)


def _reason(exc: BaseException) -> str:
    """One readable line for a skipped input."""
    # MONAI wraps transform errors ("applying transform <...>"): the innermost message is the useful one
    while exc.__cause__ is not None and not isinstance(exc, InputRejected):
        exc = exc.__cause__
    text = str(exc).strip()
    if "cannot find a suitable reader" in text:  # LoadImage tried every reader: give the first two readers' own words
        words = []
        for chunk in text.split("Traceback (most recent call last):")[1:]:
            last = [line.strip() for line in chunk.strip().splitlines() if line.strip()][-1]
            if last not in words:
                words.append(last)
        return "no reader could open it: " + "; ".join(w[:160] for w in words[:2])
    text = text.splitlines()[0] if text else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def refuse_existing(path: str, overwrite: bool = False) -> None:
    """Stop before any work when a run's single output file (e.g. ``predictions.csv``) exists, unless ``overwrite``."""
    if Path(path).exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; set overwrite to replace it (or choose another output_dir)")


class ScreenedDataset(torch.utils.data.Dataset):
    """A dataset whose items either preprocess cleanly or become skip records; it never raises for one item.

    Args:
        data: the datalist, ``[{"image": path, ...}]`` (an ``input`` entry, when present, names the item).
        transform: the preprocessing (a MONAI ``Compose``) applied to a copy of each item.
        key: the item's image key (for naming the input in a skip record).
        info_keys: item entries left out of the copy: they are for the summary (which reads them from the
            datalist in :meth:`InferenceSummary.begin`), not for the transforms or the batch.

    Example::

        >>> ds = ScreenedDataset([{"image": "ok.nii.gz"}, {"image": "broken.nii.gz"}], preprocessing)
        >>> ds[1]
        {'__skipped__': [{'input': 'broken.nii.gz', 'reason': 'EOFError: Compressed file ended ...'}]}
    """

    def __init__(self, data: Sequence[Mapping], transform: Optional[Callable] = None, key: str = "image",
                 info_keys: Sequence[str] = (SERIES,)):
        self.data = list(data)
        self.transform = transform
        self.key = key
        self.info_keys = tuple(info_keys)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int):
        item = {k: v for k, v in self.data[index].items() if k not in self.info_keys}
        item.setdefault("input", input_of(item, self.key))
        t0 = time.perf_counter()
        try:
            out = self.transform(item) if self.transform is not None else item
        except Exception as e:  # one bad input must not stop the others
            return {SKIPPED: [{"input": item["input"], "reason": _reason(e)}]}
        out[PREPROCESS_SECONDS] = time.perf_counter() - t0
        return out


def screened_collate(items: Sequence[Mapping]) -> dict:
    """MONAI's ``list_data_collate`` over the good items; the skip records ride along under ``SKIPPED``."""
    skipped = [rec for it in items if SKIPPED in it for rec in it[SKIPPED]]
    good = [it for it in items if SKIPPED not in it]
    batch = list_data_collate(good) if good else {}
    batch[SKIPPED] = skipped
    return batch


class InferenceSummary:
    """What an inference run did with each input, for the terminal, ``inference_summary.json`` and the exit status.

    Args:
        input_dir: the folder the inputs came from (reported only).
        output_dir: where outputs and ``inference_summary.json`` go.
        unusable: inputs refused before loading (``[{"input": ..., "reason": ...}]``, e.g. from
            :func:`fedharmony.data.images.find_inputs`). A record with ``"status": "not selected"`` (an input
            this bundle does not take) or ``"note"`` is listed but is no error; a ``series`` entry is kept.
        allow_skipped: end with exit status 0 even when inputs were skipped.

    Example::

        >>> summary = InferenceSummary("export", "masks", unusable=[
        ...     {"input": "export/CT/5", "reason": "not selected: Modality 'CT' is not MR", "status": "not selected"}])
        >>> summary.begin(datalist); ...; summary.finish()   # exit status 0: nothing was skipped
    """

    def __init__(self, input_dir: str, output_dir: str, unusable: Sequence[Mapping] = (), allow_skipped: bool = False):
        self.input_dir, self.output_dir = str(input_dir), str(output_dir)
        self.allow_skipped = bool(allow_skipped)
        self.processed: Dict[str, List[str]] = {}  # input -> its outputs, in the order processed
        self.seconds: Dict[str, float] = {}  # input -> loading + preprocessing + inference + postprocessing
        self.skipped: List[Dict[str, Any]] = []
        self.not_selected: List[Dict[str, Any]] = []
        self.notes: List[Dict[str, Any]] = []
        self.series: Dict[str, Mapping] = {}  # input -> its DICOM series record
        self.results: Dict[str, Dict[str, Any]] = {}  # input -> volumes, review flag, DICOM outputs (SaveResultsd)
        for rec in unusable:
            status = rec.get("status")
            if SERIES in rec:
                self.series[str(rec["input"])] = rec[SERIES]
            if status == NOT_SELECTED:
                self.not_selected.append(self._record(rec["input"], rec["reason"]))
                logger.info("not selected %s: %s", rec["input"], rec["reason"])
            elif status == NOTE:
                self.notes.append(self._record(rec["input"], rec["reason"]))
                logger.info("note %s: %s", rec["input"], rec["reason"])
            else:
                self.skip(rec["input"], rec["reason"])

    def _record(self, input_path: str, reason: str) -> Dict[str, Any]:
        rec: Dict[str, Any] = {"input": str(input_path), "reason": str(reason)}
        if str(input_path) in self.series:
            rec[SERIES] = dict(self.series[str(input_path)])
        return rec

    def skip(self, input_path: str, reason: str) -> None:
        self.processed.pop(str(input_path), None)  # a mask already saved stays on disk; the input still failed
        self.results.pop(str(input_path), None)
        self.skipped.append(self._record(input_path, reason))
        logger.warning("skipped %s: %s", input_path, reason)

    def done(self, input_path: str, seconds: Optional[float] = None) -> None:
        self.processed.setdefault(str(input_path), [])
        if seconds is not None:
            self.seconds[str(input_path)] = round(float(seconds), 3)
        logger.info("processed %s%s", input_path, f" in {seconds:.2f} s" if seconds is not None else "")

    def add_output(self, input_path: str, output_path: str) -> None:
        self.processed.setdefault(str(input_path), []).append(str(output_path))

    def add_result(self, input_path: str, result: Mapping[str, Any]) -> None:
        """Record what :class:`fedharmony.bundle.results.SaveResultsd` measured and wrote for one input (gland
        volume, review flag and reason, DICOM SEG / RTSTRUCT paths); DICOM result paths also join its outputs."""
        self.results.setdefault(str(input_path), {}).update(result)
        for fmt in ("dicom_seg", "rtstruct"):
            if fmt in result:
                self.add_output(input_path, result[fmt])

    @property
    def needs_review(self) -> List[str]:
        return [k for k in self.processed if self.results.get(k, {}).get("needs_review")]

    def as_dict(self) -> dict:
        def entry(k, v):
            rec = {"input": k, "outputs": v, "seconds": self.seconds.get(k), **self.results.get(k, {})}
            if k in self.series:
                rec[SERIES] = dict(self.series[k])
            return rec

        summary = {"input_dir": self.input_dir, "output_dir": self.output_dir,
                   "processed": len(self.processed), "skipped": len(self.skipped),
                   "not_selected": len(self.not_selected), "needs_review": len(self.needs_review),
                   "inputs": [entry(k, v) for k, v in self.processed.items()],
                   "skipped_inputs": self.skipped, "not_selected_inputs": self.not_selected, "notes": self.notes}
        if self.series:  # DICOM series by their fate (a series is one input, or one skipped / not selected record)
            fate = {"segmented": [k for k in self.processed if k in self.series],
                    "skipped": [r["input"] for r in self.skipped if SERIES in r],
                    "not_selected": [r["input"] for r in self.not_selected if SERIES in r]}
            summary["dicom_series"] = {"found": sum(len(v) for v in fate.values()),
                                       **{k: len(v) for k, v in fate.items()}}
        summary["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        return summary

    def begin(self, datalist: Sequence) -> None:
        """Before the model is loaded: note each input's DICOM series; with nothing usable to process, end the
        run here (after :meth:`finish`)."""
        for item in datalist:
            if isinstance(item, Mapping) and SERIES in item:
                self.series[input_of(item)] = item[SERIES]
        logger.info("inference: %d input(s) to process, %d refused already, %d not selected", len(datalist),
                    len(self.skipped), len(self.not_selected))
        if not datalist:
            self.finish()  # exits with status 1 unless every refusal is allowed
            raise SystemExit(0)

    def finish(self) -> dict:
        """Write the summary beside the outputs, print it, and exit with status 1 if anything was skipped
        (unless ``allow_skipped``) or if there was no input at all. Returns the summary otherwise."""
        summary = self.as_dict()
        Path(self.output_dir).mkdir(parents=True, exist_ok=True)
        path = Path(self.output_dir) / SUMMARY_NAME
        atomic_write_text(path, json.dumps(summary, indent=2) + "\n")
        atomic_write_text(Path(self.output_dir) / SUMMARY_CSV, self.csv_text(summary))
        review = self.needs_review
        lines = [f"inference: processed {len(self.processed)}, skipped {len(self.skipped)}"
                 + (f", NEEDS REVIEW {len(review)}" if review else "") + f" (summary: {path})"]
        lines += [f"  needs review {k}: {self.results[k]['review_reason']}" for k in review]
        lines += [f"  note {k}: {self.results[k]['note']}" for k in self.processed if self.results.get(k, {}).get("note")]
        lines += [f"  skipped {rec['input']}: {rec['reason']}" for rec in self.skipped]
        if self.not_selected:
            lines.append(f"  not selected {len(self.not_selected)} (not for this bundle; no error):")
            lines += [f"    {rec['input']}: {rec['reason'].removeprefix(NOT_SELECTED + ': ')}"
                      for rec in self.not_selected]
        dropped = [(k, self.series[k]["dropped"]) for k in self.processed if self.series.get(k, {}).get("dropped")]
        lines += [f"  note {k}: dropped {what}" for k, what in dropped]
        lines += [f"  note {rec['input']}: {rec['reason']}" for rec in self.notes]
        if not self.processed and not self.skipped:  # most likely the wrong folder: say so, whatever the flags
            lines.append(f"  no input found in {self.input_dir}" if not self.not_selected else
                         f"  nothing to segment in {self.input_dir}: every input found is not for this bundle")
        print("\n".join(lines), flush=True)
        if (self.skipped and not self.allow_skipped) or not (self.processed or self.skipped):
            raise SystemExit(1)
        return summary

    def csv_text(self, summary: Optional[Mapping] = None) -> str:
        """``inference_summary.csv``: one row per input (processed, skipped, not selected) with its status, gland
        volume (mL; per zone where there are zones), review flag and reason, and output paths."""
        summary = summary if summary is not None else self.as_dict()
        zones = sorted({z for rec in summary["inputs"] for z in rec.get("volumes_ml", {})})
        fields = (["input", "status", "gland_volume_ml"] + [f"{z} volume_ml" for z in zones]
                  + ["needs_review", "review_reason", "nifti", "dicom_seg", "rtstruct", "series_uid", "reason"])
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        for rec in summary["inputs"]:
            row = {"input": rec["input"], "status": "done", "gland_volume_ml": rec.get("gland_volume_ml", ""),
                   "needs_review": {True: "yes", False: "no"}.get(rec.get("needs_review"), ""),
                   "review_reason": rec.get("review_reason", ""), "reason": rec.get("note", ""),
                   "nifti": "; ".join(o for o in rec["outputs"] if o.endswith((".nii.gz", ".nii"))),
                   "dicom_seg": rec.get("dicom_seg", ""), "rtstruct": rec.get("rtstruct", ""),
                   "series_uid": rec.get(SERIES, {}).get("series_uid", "")}
            row.update({f"{z} volume_ml": v for z, v in rec.get("volumes_ml", {}).items()})
            writer.writerow(row)
        for status, records in (("skipped", summary["skipped_inputs"]), ("not selected", summary["not_selected_inputs"])):
            for rec in records:
                writer.writerow({"input": rec["input"], "status": status, "reason": rec["reason"],
                                 "series_uid": rec.get(SERIES, {}).get("series_uid", "")})
        return buf.getvalue()


class FolderEvaluator(SupervisedEvaluator):
    """MONAI's ``SupervisedEvaluator`` that skips, names and records a failing input instead of stopping.

    Takes every ``SupervisedEvaluator`` argument plus ``summary`` (an :class:`InferenceSummary`).
    Skip records carried by the batch (:func:`screened_collate`) are recorded; a batch whose inference
    or postprocessing raises is recorded as skipped, item by item, and the run goes on.
    """

    def __init__(self, *args, summary: InferenceSummary, **kwargs):
        super().__init__(*args, **kwargs)
        self.summary = summary

    def _iteration(self, engine, batchdata):
        if isinstance(batchdata, dict):
            for rec in batchdata.pop(SKIPPED, []):
                self.summary.skip(rec["input"], rec["reason"])
            if not batchdata:
                return {}
        inputs = [str(x) for x in batchdata.get("input", [])] if isinstance(batchdata, dict) else []
        prep = batchdata.get(PREPROCESS_SECONDS) if isinstance(batchdata, dict) else None
        prep = [float(s) for s in prep] if prep is not None else [0.0] * len(inputs)
        t0 = time.perf_counter()
        try:
            output = super()._iteration(engine, batchdata)
        except Exception as e:  # inference, inverse transforms or saving failed for this batch
            for name in inputs or ["(batch without input names)"]:
                self.summary.skip(name, _reason(e))
            engine.state.output = {}
            return {}
        share = (time.perf_counter() - t0) / max(len(inputs), 1)  # a batch's inference, split evenly
        for name, seconds in zip(inputs, prep):
            self.summary.done(name, seconds + share)
        return output


def mask_and_affine(pred) -> tuple:
    """A postprocessed prediction (``(1, H, W, D)`` or ``(H, W, D)``, on its input's grid after ``Invertd``) as a
    ``(H, W, D)`` NumPy mask and its 4 x 4 affine (the identity when the prediction carries none)."""
    arr = np.asarray(pred.detach().cpu() if isinstance(pred, torch.Tensor) else pred)
    if arr.ndim == 4 and arr.shape[0] == 1:
        arr = arr[0]
    affine = np.asarray(pred.affine if isinstance(pred, MetaTensor) else np.eye(4), dtype=np.float64)
    return arr, affine


class SaveMaskd(MapTransform):
    """Write each prediction as ``<output_dir>/<name><postfix>.nii.gz`` with the geometry of its input.

    The mask is written to a temporary file in ``output_dir`` and renamed into place, so a run that
    stops leaves no half-written mask. An existing mask is never replaced unless ``overwrite``: the
    item is refused (and reported) instead.

    Args:
        keys: the prediction key(s), (1, H, W, D) label maps whose MetaTensor affine is the input's
            (after ``Invertd``).
        output_dir: folder for the masks (created).
        name_key: item entry holding the output's base name (``name`` from ``find_inputs``); without
            it, the input file's name without its extension.
        postfix: appended to the name.
        overwrite: replace existing masks.
        summary: where to record each written file (optional).
        dtype: stored data type.
        output_format: the run's ``output_format`` (:func:`parse_output_format`):
            without ``nifti`` a DICOM input gets no NIfTI mask (its DICOM results come from
            :class:`fedharmony.bundle.results.SaveResultsd`); a NIfTI input always does.
    """

    def __init__(self, keys, output_dir: str, name_key: str = "name", postfix: str = "_seg", overwrite: bool = False,
                 summary: Optional[InferenceSummary] = None, dtype=np.uint8, allow_missing_keys: bool = False,
                 output_format: Union[str, Sequence[str]] = "nifti"):
        super().__init__(keys, allow_missing_keys)
        self.formats = parse_output_format(output_format)
        self.output_dir = Path(output_dir)
        self.name_key, self.postfix, self.overwrite = name_key, postfix, bool(overwrite)
        self.summary, self.dtype = summary, dtype

    def output_path(self, item: Mapping) -> Path:
        name = item.get(self.name_key)
        if not name:
            base = Path(input_of(item)).name
            name = base[:-7] if base.endswith(".nii.gz") else os.path.splitext(base)[0]
        return self.output_dir / f"{name}{self.postfix}.nii.gz"

    def __call__(self, data: Mapping) -> dict:
        import nibabel as nib

        d = dict(data)
        if "nifti" not in self.formats and self.summary is not None and input_of(d) in self.summary.series:
            return d  # a DICOM input asked for DICOM results only
        for key in self.key_iterator(d):
            arr, affine = mask_and_affine(d[key])
            out = self.output_path(d)
            if out.exists() and not self.overwrite:
                raise InputRejected(f"{out.name} already exists in {out.parent}; set overwrite to replace it")
            self.output_dir.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".nii.gz", dir=self.output_dir)
            os.close(fd)
            try:
                nib.save(nib.Nifti1Image(arr.astype(self.dtype), affine), tmp)
                os.replace(tmp, out)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
            logger.info("wrote %s", out)
            if self.summary is not None:
                self.summary.add_output(input_of(d), str(out))
        return d
