"""Results hospitals can open: a mask written back as DICOM SEG (highdicom) and RT Structure Set (rt-utils).

PACS viewers (OHIF, 3D Slicer with QuantitativeReporting, the vendors' viewers) open DICOM SEG; radiotherapy
planning systems import RT Structure Sets; none opens a NIfTI mask. The pieces here turn a mask on its input's
grid (what the bundle's inference writes as NIfTI, after ``Invertd``) into both, referring to the source series:

* :func:`read_source_series`: the source series' datasets (a series folder, or its files in any order), sorted
  spatially along the slice normal, never by file name or instance number; one multi-frame file is one series.
* :func:`mask_on_source_frames`: the mask sampled on every source frame, by geometry (each frame's position and
  orientation against the mask's affine), so file order, feet-to-head storage and oblique slices give the frame
  its own pixels; a mask that is not on the source grid is refused.
* :func:`write_seg`: a BINARY, uncompressed DICOM SEG, one frame per source frame and segment (empty frames
  too, as viewers expect), in the source study, a new series named after the bundle and its version, segments
  coded in SNOMED CT (:data:`SEGMENT_CODES`), the algorithm identified (family artificial intelligence, type
  automatic).
* :func:`write_rtstruct`: an RT Structure Set, the mask's contours per slice in patient coordinates, one ROI per
  label, referring to the same instances (rt-utils builds the dataset and finds the contours; single-frame series
  only).

highdicom, rt-utils and OpenCV are imported at first use: NIfTI-only inference needs none of them. Example::

    from fedharmony.data.dicom_out import read_source_series, mask_on_source_frames, write_seg

    series = read_source_series("export/T2")                        # folder, or the series' files
    frames = mask_on_source_frames(mask_xyz, affine_ras, series)    # (frames, rows, cols) labels
    write_seg(series, frames, {1: "prostate"}, "out/case_seg.dcm", algorithm="prostate_mri_seg", version="0.12.0")
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import List, Mapping, Sequence, Tuple, Union

import numpy as np

__all__ = ["SourceSeries", "SEGMENT_CODES", "read_source_series", "mask_on_source_frames", "write_seg",
           "write_rtstruct", "DicomOutputError", "SEG_SOP_CLASS", "RTSTRUCT_SOP_CLASS"]

logger = logging.getLogger(__name__)

SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
RTSTRUCT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.481.3"

# segment name -> (SNOMED CT code, meaning); category: anatomical structure (SCT 123037004)
SEGMENT_CODES = {
    "prostate": ("41216001", "Prostate"),
    "peripheral zone": ("279706003", "Peripheral zone of the prostate"),
    "transition zone": ("399384005", "Transition zone of the prostate"),
    "brain": ("12738006", "Brain"),
    # the DICOM standard's codes for the CNS tissues (as pydicom's codes.SCT.GrayMatter / WhiteMatter): the brain
    # bundle's second label set holds cerebellum and brainstem too, so not the cerebral-only concepts
    "grey matter": ("389081007", "Gray matter"),
    "white matter": ("389080008", "White matter"),
}
_ANATOMICAL_STRUCTURE = ("123037004", "Anatomical Structure")
_ALIGN_TOL = 0.1  # voxels: how far a source pixel may lie from a mask voxel centre and still be "on the grid"


class DicomOutputError(ValueError):
    """A DICOM result that cannot be written for this input (the message names it and says why)."""


@dataclass
class SourceSeries:
    """One source series, sorted spatially.

    ``datasets``: the pydicom datasets (single-frame images in slice order, or one multi-frame image);
    ``positions``: (frames, 3) ImagePositionPatient of each frame (LPS, mm), in the same order;
    ``orientation``: (6,) ImageOrientationPatient (row direction, column direction); ``spacing``: PixelSpacing
    (between rows, between columns); ``rows``, ``columns``; ``name``: how the input is named in messages.
    """

    datasets: list
    positions: np.ndarray
    orientation: np.ndarray
    spacing: Tuple[float, float]
    rows: int
    columns: int
    name: str

    @property
    def multiframe(self) -> bool:
        return len(self.datasets) == 1 and len(self.positions) > 1

    @property
    def frames(self) -> int:
        return len(self.positions)

    @property
    def study_uid(self) -> str:
        return str(self.datasets[0].StudyInstanceUID)

    @property
    def series_uid(self) -> str:
        return str(self.datasets[0].SeriesInstanceUID)

    @property
    def instance_uids(self) -> List[str]:
        return [str(ds.SOPInstanceUID) for ds in self.datasets]


def _files(source: Union[str, Path, Sequence[Union[str, Path]]]) -> List[Path]:
    if isinstance(source, (str, Path)):
        p = Path(source)
        return sorted(f for f in p.iterdir() if f.is_file()) if p.is_dir() else [p]
    return [Path(s) for s in source]


def _frame_geometry(ds, name: str):
    """(positions (n, 3), orientation (6,), spacing (2,)) of one dataset: single-frame, legacy or enhanced
    multi-frame."""
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    shared = ds.get("SharedFunctionalGroupsSequence", [None])[0]
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")

    def find(keyword, seq_keyword, i=None):
        if keyword in ds:
            return ds[keyword].value
        for groups in ([per_frame[i]] if per_frame is not None and i is not None else []) + [shared]:
            if groups is not None and seq_keyword in groups and keyword in groups[seq_keyword][0]:
                return groups[seq_keyword][0][keyword].value
        return None

    orientation = find("ImageOrientationPatient", "PlaneOrientationSequence", 0)
    spacing = find("PixelSpacing", "PixelMeasuresSequence", 0)
    if orientation is None or spacing is None:
        raise DicomOutputError(f"{name}: no ImageOrientationPatient / PixelSpacing: the image has no patient "
                               "geometry to refer a segmentation to")
    if frames > 1 and per_frame is None:
        raise DicomOutputError(f"{name}: a multi-frame image without per-frame positions (legacy multi-frame); "
                               "no DICOM result can be placed on its frames")
    positions = [find("ImagePositionPatient", "PlanePositionSequence", i) for i in range(frames)]
    if any(p is None for p in positions):
        raise DicomOutputError(f"{name}: no ImagePositionPatient for every frame")
    return (np.asarray(positions, dtype=float), np.asarray(orientation, dtype=float),
            tuple(float(s) for s in spacing))


def read_source_series(source: Union[str, Path, Sequence[Union[str, Path]]], name: str = "") -> SourceSeries:
    """The image datasets of one series (a folder holding it, or its files), sorted along the slice normal.

    Files without pixel data and files that are no DICOM are ignored; the images must be one series in one
    orientation. Pixel data is read but not decoded (any transfer syntax will do).

    Raises:
        DicomOutputError: no image, several series, several orientations, or no patient geometry.
    """
    import pydicom

    name = name or str(source)
    datasets = []
    for f in _files(source):
        try:
            ds = pydicom.dcmread(str(f))
        except Exception:  # not DICOM, or unreadable: find_inputs has named it already
            continue
        if "PixelData" in ds and "SOPInstanceUID" in ds:
            datasets.append(ds)
    if not datasets:
        raise DicomOutputError(f"{name}: no DICOM image found to refer the result to")
    uids = {str(ds.SeriesInstanceUID) for ds in datasets}
    if len(uids) > 1:
        raise DicomOutputError(f"{name}: {len(uids)} series among the source files; one series is one input")
    if not all("FrameOfReferenceUID" in ds for ds in datasets):
        raise DicomOutputError(f"{name}: the source images have no FrameOfReferenceUID; DICOM SEG and RTSTRUCT "
                               "refer to it (the export is not conformant)")
    if len(datasets) > 1 and any(int(ds.get("NumberOfFrames", 1) or 1) > 1 for ds in datasets):
        raise DicomOutputError(f"{name}: several multi-frame files in one series")
    geometry = [_frame_geometry(ds, name) for ds in datasets]
    orientation, spacing = geometry[0][1], geometry[0][2]
    if any(not np.allclose(g[1], orientation, atol=1e-4) for g in geometry):
        raise DicomOutputError(f"{name}: the images of the series have different orientations")
    normal = np.cross(orientation[:3], orientation[3:])
    if len(datasets) > 1:  # single-frame images: by position along the normal, never by name or InstanceNumber
        order = np.argsort([float(np.dot(g[0][0], normal)) for g in geometry], kind="stable")
        datasets = [datasets[i] for i in order]
        positions = np.concatenate([geometry[i][0] for i in order])
    else:
        positions = geometry[0][0]
    return SourceSeries(datasets, positions, orientation, spacing, int(datasets[0].Rows), int(datasets[0].Columns),
                        name)


def mask_on_source_frames(mask: np.ndarray, affine_ras: np.ndarray, series: SourceSeries) -> np.ndarray:
    """The label mask ``mask`` (``(x, y, z)``, RAS ``affine_ras``, as MONAI holds a volume) on every source frame.

    Each frame's pixel centres are mapped into the mask's voxel indices by geometry, so the result does not depend
    on the order of files or of the mask's axes. Returns ``(frames, rows, columns)`` ``uint8``, frames in
    ``series`` order.

    Raises:
        DicomOutputError: a source pixel lies off the mask's grid (the mask was not brought back to the
            source geometry) or outside the mask.
    """
    mask = np.asarray(mask)
    if mask.ndim == 4 and mask.shape[0] == 1:
        mask = mask[0]
    if mask.ndim != 3:
        raise DicomOutputError(f"{series.name}: a {mask.ndim}-D mask; a 3-D label map is needed")
    to_lps = np.diag([-1.0, -1.0, 1.0, 1.0])
    inv = np.linalg.inv(to_lps @ np.asarray(affine_ras, dtype=float))
    row_dir, col_dir = series.orientation[:3], series.orientation[3:]
    dr, dc = series.spacing  # between rows (along the column direction), between columns (along the row direction)
    rr, cc = np.meshgrid(np.arange(series.rows), np.arange(series.columns), indexing="ij")
    out = np.zeros((series.frames, series.rows, series.columns), dtype=np.uint8)
    for f, position in enumerate(series.positions):
        points = (position[None, None, :] + cc[..., None] * dc * row_dir + rr[..., None] * dr * col_dir)
        ijk = points @ inv[:3, :3].T + inv[:3, 3]
        idx = np.rint(ijk)
        off = np.abs(ijk - idx).max()
        if off > _ALIGN_TOL:
            raise DicomOutputError(f"{series.name}: the mask is not on the source grid (frame {f} lies {off:.2f} "
                                   "voxels off it); DICOM results need the mask on the source series' grid")
        idx = idx.astype(int)
        if (idx < 0).any() or (idx >= np.asarray(mask.shape)).any():
            raise DicomOutputError(f"{series.name}: source frame {f} lies outside the mask "
                                   f"(mask shape {tuple(mask.shape)})")
        out[f] = mask[idx[..., 0], idx[..., 1], idx[..., 2]]
    return out


def _code(name: str):
    from pydicom.sr.coding import Code

    key = name.strip().lower()
    if key not in SEGMENT_CODES:
        raise DicomOutputError(f"segment {name!r} has no SNOMED CT code here; known: {sorted(SEGMENT_CODES)}")
    value, meaning = SEGMENT_CODES[key]
    return Code(value, "SCT", meaning)


def _atomic_save(write, out: Path, overwrite: bool) -> Path:
    """Call ``write(tmp_path)`` and rename the file into ``out``; never over an existing file unless ``overwrite``."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise DicomOutputError(f"{out.name} already exists in {out.parent}; set overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".dcm", dir=out.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def _description(algorithm: str, version: str, what: str) -> str:
    return f"{what} {algorithm} {version}".strip()[:64]  # LO: 64 characters


def write_seg(series: SourceSeries, frames: np.ndarray, segments: Mapping[int, str], out_path: Union[str, Path], *,
              algorithm: str, version: str, series_number: int = 901, overwrite: bool = False) -> Path:
    """Write ``frames`` (``(frames, rows, columns)`` labels, from :func:`mask_on_source_frames`) as a DICOM SEG.

    BINARY, explicit VR little endian (uncompressed), one frame per source frame and segment, empty frames
    included; in the source study, a new series "SEG <algorithm> <version>"; each label of ``segments``
    (``{1: "prostate"}``; names from :data:`SEGMENT_CODES`) a segment coded in SNOMED CT, algorithm type
    AUTOMATIC, family artificial intelligence. Written atomically; an existing file is kept unless ``overwrite``.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    frames = np.asarray(frames)
    if frames.shape != (series.frames, series.rows, series.columns):
        raise DicomOutputError(f"{series.name}: {frames.shape} mask frames for {series.frames} source frames of "
                               f"{series.rows} x {series.columns}")
    labels = sorted(int(k) for k in segments)
    algo = hd.AlgorithmIdentificationSequence(name=algorithm, family=codes.cid7162.ArtificialIntelligence,
                                              version=version)
    descriptions = [hd.seg.SegmentDescription(
        segment_number=i + 1, segment_label=str(segments[label])[:64],
        segmented_property_category=_code_category(), segmented_property_type=_code(segments[label]),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algo)
        for i, label in enumerate(labels)]
    pixels = np.stack([frames == label for label in labels], axis=-1)  # (frames, rows, cols, segments)
    seg = hd.seg.Segmentation(
        source_images=series.datasets, pixel_array=pixels, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=series_number,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="fedharmony",
        manufacturer_model_name=algorithm[:64], software_versions=version, device_serial_number="none",
        series_description=_description(algorithm, version, "SEG"), content_label="SEGMENTATION",
        content_description=f"{algorithm} {version}"[:64], omit_empty_frames=False)
    return _atomic_save(lambda tmp: seg.save_as(tmp), Path(out_path), overwrite)


def _code_category():
    from pydicom.sr.coding import Code

    return Code(*_ANATOMICAL_STRUCTURE[:1], "SCT", _ANATOMICAL_STRUCTURE[1])


_COLORS = [[255, 140, 0], [0, 160, 255], [0, 200, 80], [220, 0, 120]]


def write_rtstruct(series: SourceSeries, frames: np.ndarray, segments: Mapping[int, str],
                   out_path: Union[str, Path], *, algorithm: str, version: str, overwrite: bool = False) -> Path:
    """Write ``frames`` as an RT Structure Set: one ROI per label of ``segments``, its contours per slice in patient
    coordinates, referring to the source instances, in the source study, a new series
    "RTSTRUCT <algorithm> <version>". A label with no voxel gets an ROI without contours.

    rt-utils builds the dataset (patient, study, frame of reference, the referenced instances, ROI records) and
    finds the contours (OpenCV, every boundary pixel, holes as their own contours); each contour point is placed
    here from its own instance's ImagePositionPatient and PixelSpacing, because rt-utils 1.2.7's own placement
    swaps the two in-plane spacings (wrong for non-square pixels) and steps slices from the first one.

    Raises:
        DicomOutputError: a multi-frame source (an RTSTRUCT contour refers to a single-frame image).
    """
    import pydicom
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence as DicomSequence
    from rt_utils import ds_helper
    from rt_utils.image_helper import find_mask_contours
    from rt_utils.utils import ROIData

    if series.multiframe:
        raise DicomOutputError(f"{series.name}: RTSTRUCT needs a single-frame series (its contours refer to "
                               "single-frame images); this series is one multi-frame image: use dicom_seg")
    frames = np.asarray(frames)
    if frames.shape != (series.frames, series.rows, series.columns):
        raise DicomOutputError(f"{series.name}: {frames.shape} mask frames for {series.frames} source frames of "
                               f"{series.rows} x {series.columns}")
    with _quiet_pydicom():  # rt-utils sets pydicom's deprecated encoding attributes
        ds = ds_helper.create_rtstruct_dataset(series.datasets)
    ds.SeriesDescription = _description(algorithm, version, "RTSTRUCT")
    ds.StructureSetLabel = algorithm[:16]
    ds.Manufacturer, ds.ManufacturerModelName, ds.SoftwareVersions = "fedharmony", algorithm[:64], version
    ds.SeriesNumber = 902
    row_dir, col_dir = series.orientation[:3], series.orientation[3:]
    dr, dc = series.spacing
    for number, label in enumerate(sorted(int(k) for k in segments), start=1):
        roi = ROIData(mask=None, color=_COLORS[(number - 1) % len(_COLORS)], number=number, name=str(segments[label]),
                      frame_of_reference_uid=ds.ReferencedFrameOfReferenceSequence[0].FrameOfReferenceUID,
                      description=f"{algorithm} {version}", approximate_contours=False,
                      roi_generation_algorithm="AUTOMATIC")
        ds.StructureSetROISequence.append(ds_helper.create_structure_set_roi(roi))
        contours = DicomSequence()
        for image, position, frame in zip(series.datasets, series.positions, frames == label):
            if not frame.any():
                continue
            for points in find_mask_contours(frame, approximate_contours=False)[0]:
                xy = np.asarray(points, dtype=float)  # (column, row) per point
                patient = position + xy[:, :1] * dc * row_dir + xy[:, 1:2] * dr * col_dir
                contours.append(ds_helper.create_contour(image, np.round(patient, 4).ravel().tolist()))
        item = Dataset()
        item.ROIDisplayColor = roi.color
        if len(contours):
            item.ContourSequence = contours
        item.ReferencedROINumber = number
        ds.ROIContourSequence.append(item)
        ds.RTROIObservationsSequence.append(ds_helper.create_rtroi_observation(roi))

    def save(tmp):  # rt-utils' own save() prints; the dataset is written as it builds it (implicit VR little endian)
        with _quiet_pydicom():
            pydicom.dcmwrite(tmp, ds, implicit_vr=True, little_endian=True, enforce_file_format=True)

    return _atomic_save(save, Path(out_path), overwrite)


@contextlib.contextmanager
def _quiet_pydicom():
    level = logging.getLogger("pydicom").level
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        logging.getLogger("pydicom").setLevel(level)
