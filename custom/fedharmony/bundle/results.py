"""What the hospital reads first: the gland volume, a "needs review" flag, and the results in DICOM.

:class:`SaveResultsd` runs after :class:`fedharmony.bundle.folder_inference.SaveMaskd` in an inference
config's postprocessing. For every mask (on its input's grid, after ``Invertd``) it

* measures the volume of each label and of the whole gland in mL (:func:`mask_report`);
* flags the result for review, with the reason, where it is implausible: no gland found, a gland volume
  outside ``plausible_volume_ml``, or a mask in pieces (more than one 3-D connected piece holding at least
  ``min_piece_fraction`` of the mask);
* for a DICOM input, writes the ``output_format``'s DICOM results beside the NIfTI masks:
  ``<name>_seg.dcm`` (DICOM SEG) and ``<name>_rtstruct.dcm`` (RT Structure Set), referring to the source series
  (:mod:`fedharmony.data.dicom_out`). A NIfTI input has no UIDs to refer to: it keeps its NIfTI mask and the
  summary says so.

Everything lands in the :class:`~fedharmony.bundle.folder_inference.InferenceSummary` (``inference_summary.json``
and ``inference_summary.csv``); the run's exit status is not changed by a review flag (it is a result, not an
error), but every flagged input is printed at the end.

In a bundle config::

    {"_target_": "fedharmony.bundle.results.SaveResultsd", "keys": "pred", "output_dir": "@output_dir",
     "output_format": "@output_format", "sources": "@datalist", "segments": "@segments", "review": "@review",
     "num_classes": "@num_classes", "metadata_file": "$@bundle_root + '/configs/metadata.json'",
     "overwrite": "@overwrite", "summary": "@summary"}
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Dict, Hashable, List, Mapping, Optional, Sequence, Union

import numpy as np
from monai.transforms import MapTransform

from fedharmony.bundle.folder_inference import (OUTPUT_FORMATS, InferenceSummary, InputRejected, input_of,
                                                mask_and_affine, parse_output_format)

__all__ = ["OUTPUT_FORMATS", "parse_output_format", "mask_report", "check_segments", "SaveResultsd", "DEFAULT_REVIEW"]

logger = logging.getLogger("fedharmony.inference")

DICOM_FORMATS = ("dicom_seg", "rtstruct")
# the plausible whole-gland range: adult prostates are about 15-150 mL, large benign hyperplasia reaches ~300 mL
DEFAULT_REVIEW = {"plausible_volume_ml": [10.0, 300.0], "min_piece_fraction": 0.05}


def mask_report(mask: np.ndarray, affine: np.ndarray, segments: Mapping[int, str],
                review: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """Volumes (mL) and the review verdict of one label mask ``(x, y, z)`` with its ``affine`` (mm).

    Returns ``{"gland_volume_ml", "volumes_ml": {segment name: mL} (with more than one segment), "pieces",
    "needs_review": bool, "review_reason": text}``.
    """
    from scipy import ndimage

    review = {**DEFAULT_REVIEW, **(review or {})}
    mask = np.asarray(mask)
    if mask.ndim == 4 and mask.shape[0] == 1:
        mask = mask[0]
    voxel_ml = abs(float(np.linalg.det(np.asarray(affine, dtype=float)[:3, :3]))) / 1000.0
    labels = sorted(int(k) for k in segments)
    volumes = {str(segments[k]): round(float((mask == k).sum()) * voxel_ml, 3) for k in labels}
    gland = np.isin(mask, labels)
    total = float(gland.sum())
    out: Dict[str, Any] = {"gland_volume_ml": round(total * voxel_ml, 3)}
    if len(labels) > 1:
        out["volumes_ml"] = volumes
    reasons = []
    pieces = 0
    if total == 0:
        reasons.append("no gland found (empty mask)")
    else:
        components, n = ndimage.label(gland, structure=np.ones((3, 3, 3)))
        sizes = np.bincount(components.ravel())[1:]
        pieces = int((sizes >= float(review["min_piece_fraction"]) * total).sum())
        low, high = (float(v) for v in review["plausible_volume_ml"])
        if not low <= out["gland_volume_ml"] <= high:
            reasons.append(f"gland volume {out['gland_volume_ml']:.1f} mL outside the plausible {low:g}-{high:g} mL")
        if pieces > 1:
            reasons.append(f"mask in {pieces} pieces (each at least {review['min_piece_fraction']:.0%} of the mask)")
    out["pieces"] = pieces
    out["needs_review"] = bool(reasons)
    out["review_reason"] = "; ".join(reasons)
    return out


def check_segments(segments: Mapping, num_classes: int) -> Dict[int, str]:
    """``segments`` (label -> name) as ``{int: str}``, refused unless it names exactly the labels 1 to
    ``num_classes`` - 1 of the network's output.

    A label without a name would vanish from the volumes and the DICOM results without a word (a grey / white
    matter model with the default ``{"1": "brain"}`` would write its grey matter as "brain" and drop its white
    matter), so the run stops before the first input instead.

    Example::

        >>> check_segments({"1": "grey matter", "2": "white matter"}, 3)
        {1: 'grey matter', 2: 'white matter'}
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2 (background included), got {num_classes!r}")
    try:
        named = {int(k): str(v) for k, v in dict(segments).items()}
    except (TypeError, ValueError) as e:
        raise ValueError(f"segments must map labels (integers) to names, got {segments!r}") from e
    wanted = list(range(1, num_classes))
    if sorted(named) != wanted:
        example = ", ".join(f"'{k}': '...'" for k in wanted)
        raise ValueError(f"segments names labels {sorted(named)}, but the network has num_classes {num_classes} "
                         f"(labels {wanted[0]} to {wanted[-1]} besides background): name each, e.g. "
                         f"--segments \"{{{example}}}\"")
    return named


def _metadata(path: Optional[str]) -> tuple:
    """(bundle id, version) from a bundle's ``configs/metadata.json``."""
    if not path or not Path(path).is_file():
        return "fedharmony", "unknown"
    meta = json.loads(Path(path).read_text())
    bundle_id = Path(path).resolve().parent.parent.name or "fedharmony"
    return bundle_id, str(meta.get("version", "unknown"))


class SaveResultsd(MapTransform):
    """Measure each mask, flag implausible ones, and write the DICOM results a DICOM input asks for.

    Args:
        keys: the prediction key (a (1, x, y, z) label map on the input's grid, after ``Invertd``).
        output_dir: where ``<name>_seg.dcm`` / ``<name>_rtstruct.dcm`` go (beside the NIfTI masks).
        output_format: ``nifti``, ``dicom_seg``, ``rtstruct`` or a list (:func:`parse_output_format`).
        sources: the datalist (``find_inputs``): each input's series folder or files, to refer to.
        segments: label -> segment name (``{"1": "prostate"}``; a zonal model ``{"1": "peripheral zone",
            "2": "transition zone"}``); names need a SNOMED CT code in
            :data:`fedharmony.data.dicom_out.SEGMENT_CODES`.
        review: ``plausible_volume_ml`` ([low, high] whole gland) and ``min_piece_fraction``.
        num_classes: the network's classes with background; given, ``segments`` must name exactly the labels
            1 to ``num_classes`` - 1 (:func:`check_segments`), checked when the transform is built.
        metadata_file: the bundle's ``configs/metadata.json`` (its name and version go into the DICOM series).
        overwrite: replace existing DICOM results.
        summary: the run's :class:`InferenceSummary`.
        name_key: item entry holding the output's base name.
    """

    def __init__(self, keys, output_dir: str, output_format: Union[str, Sequence[str]] = "nifti",
                 sources: Sequence[Mapping] = (), segments: Optional[Mapping] = None,
                 review: Optional[Mapping[str, Any]] = None, num_classes: Optional[int] = None,
                 metadata_file: Optional[str] = None, overwrite: bool = False,
                 summary: Optional[InferenceSummary] = None, name_key: str = "name", allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.output_dir = Path(output_dir)
        self.formats = parse_output_format(output_format)
        self.sources = {input_of(item): item.get("image") for item in sources if isinstance(item, Mapping)}
        self.segments = {int(k): str(v) for k, v in (segments or {1: "prostate"}).items()}
        if num_classes is not None:
            self.segments = check_segments(self.segments, num_classes)
        self.review = {**DEFAULT_REVIEW, **(review or {})}
        self.algorithm, self.version = _metadata(metadata_file)
        self.overwrite, self.summary, self.name_key = bool(overwrite), summary, name_key

    def _is_dicom(self, name: str) -> bool:
        return self.summary is not None and name in self.summary.series

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            arr, affine = mask_and_affine(d[key])
            name = input_of(d)
            result = mask_report(arr, affine, self.segments, self.review)
            wanted = [f for f in self.formats if f in DICOM_FORMATS]
            if wanted and not self._is_dicom(name):
                result["note"] = (f"{' and '.join(wanted)} not written: a NIfTI input has no DICOM UIDs to refer to; "
                                  "its result is the NIfTI mask")
            elif wanted:
                result.update(self._write_dicom(d, name, arr, affine, wanted))
            if self.summary is not None:
                self.summary.add_result(name, result)
            if result["needs_review"]:
                logger.warning("needs review %s: %s", name, result["review_reason"])
        return d

    def _write_dicom(self, d: Mapping, name: str, arr: np.ndarray, affine: np.ndarray, wanted: List[str]) -> dict:
        from fedharmony.data.dicom_out import (DicomOutputError, mask_on_source_frames, read_source_series,
                                               write_rtstruct, write_seg)

        source = self.sources.get(name)
        if source is None:
            raise InputRejected(f"{name}: its source DICOM files are not known (sources= the datalist)")
        base = d.get(self.name_key) or Path(name).name
        out: Dict[str, str] = {}
        try:
            series = read_source_series(source, name)
            frames = mask_on_source_frames(arr, affine, series)
            common = dict(algorithm=self.algorithm, version=self.version, overwrite=self.overwrite)
            if "dicom_seg" in wanted:
                path = write_seg(series, frames, self.segments, self.output_dir / f"{base}_seg.dcm", **common)
                out["dicom_seg"] = str(path)
                logger.info("wrote %s", path)
            if "rtstruct" in wanted:
                path = write_rtstruct(series, frames, self.segments, self.output_dir / f"{base}_rtstruct.dcm",
                                      **common)
                out["rtstruct"] = str(path)
                logger.info("wrote %s", path)
        except DicomOutputError as e:
            raise InputRejected(f"DICOM result not written: {e}") from e
        out["source_series_uid"], out["study_uid"] = series.series_uid, series.study_uid
        return out
