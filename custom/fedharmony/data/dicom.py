"""DICOM exports as hospitals hand them over: files grouped into series, localizers dropped, a DICOMDIR read.

A PACS export or a CD is one folder tree holding many series (several patients and studies, MR and
CT, localizers, single radiographs) and often a DICOMDIR index; nobody sorts the files by hand.
:func:`fedharmony.data.images.find_inputs` builds its inputs from the pieces here:

* :func:`read_header`: one file's header, cheaply (SimpleITK/GDCM ``ReadImageInformation``; pydicom with
  ``stop_before_pixels`` for a DICOM file without an image), as a :class:`DicomFile`, or why it is none.
* :class:`SeriesFilter`: which series a bundle takes (``series_filter``: ``"MR"``, or DICOM keywords
  with patterns); the others are *not selected*, which is not an error.
* :func:`read_dicomdir`: the files a DICOMDIR lists (pydicom's ``FileSet``), found even when a CD was
  copied with lower-case names, and the files it lists that are missing.
* :func:`split_series`: one series' files -> its main stack (localizers and images in a minority
  orientation dropped and named), or why the series is not selected or cannot be used.

No NVFlare import. Example::

    from fedharmony.data.dicom import SeriesFilter, read_header, split_series

    files = [read_header(p, SeriesFilter("MR").keywords) for p in series_paths]   # DicomFile or reason
    verdict = split_series([f for f in files if not isinstance(f, str)], SeriesFilter("MR"))
    verdict.status, verdict.reason, [f.path for f in verdict.stack], verdict.dropped
"""

from __future__ import annotations

import fnmatch
import functools
import json
import logging
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

__all__ = ["DicomFile", "SeriesFilter", "Dicomdir", "SeriesVerdict", "read_header", "read_dicomdir",
           "split_series", "stack_problem", "sort_stack", "is_dicom_file", "series_summary", "DICOMDIR_SOP_CLASS",
           "SELECTED", "NOT_SELECTED", "SKIPPED", "NO_IMAGE"]

logger = logging.getLogger(__name__)

DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"  # Media Storage Directory Storage

# what every header read keeps, by DICOM keyword (a series filter may add keywords)
BASE_KEYWORDS = ("PatientID", "StudyInstanceUID", "StudyDescription", "StudyDate", "SeriesInstanceUID",
                 "SeriesNumber", "SeriesDescription", "Modality", "ImageType", "SOPInstanceUID", "SOPClassUID")

# SOP classes of DICOM files that carry no image, to say what such a file is
NON_IMAGE_SOP = {
    DICOMDIR_SOP_CLASS: "a DICOMDIR (an index of the files on a CD)",
    "1.2.840.10008.5.1.4.1.1.88.": "a structured report",
    "1.2.840.10008.5.1.4.1.1.11.": "a presentation state",
    "1.2.840.10008.5.1.4.1.1.104.": "an encapsulated document (PDF)",
    "1.2.840.10008.5.1.4.1.1.481.": "a radiotherapy object",
    "1.2.840.10008.5.1.4.1.1.66": "a segmentation / registration object",
}

# Series descriptions scanners give their localizers (GE "3-Plane Loc", "FAST LOCALIZER", "T/S/C RF FAST PILOT";
# Siemens "localizer", "AAHScout"; Philips "Survey"): MR localizers are rarely marked in ImageType, CT scouts are
LOCALIZER_DESCRIPTION = re.compile(r"locali[sz]er|scout|survey|\bpilot\b|\bloc\b|\blocator\b", re.IGNORECASE)

# a series' fate
SELECTED, NOT_SELECTED, SKIPPED, NO_IMAGE = "selected", "not selected", "skipped", "no image"

_ORIENTATION_TOL = 1e-3  # direction cosines printed with 6 digits differ by rounding only


@functools.lru_cache(maxsize=None)
def _tag_key(keyword: str) -> str:
    """SimpleITK's metadata key (``"0008|0060"``) of a DICOM keyword (``"Modality"``)."""
    from pydicom.datadict import tag_for_keyword

    tag = tag_for_keyword(keyword)
    if tag is None:
        raise ValueError(f"{keyword!r} is not a DICOM keyword (e.g. Modality, SeriesDescription, ImageType)")
    return f"{tag >> 16:04x}|{tag & 0xFFFF:04x}"


@dataclass
class DicomFile:
    """One DICOM file's header: the tags kept (by keyword, as text, '' when absent) and its geometry.

    ``size``, ``direction`` (row-major 3 x 3: row, column and slice direction as columns, as
    SimpleITK) and ``origin`` are ``None`` for a file without an image SimpleITK can read; ``reason``
    then says what the file is.
    """

    path: Path
    tags: Dict[str, str]
    size: Optional[Tuple[int, ...]] = None
    direction: Optional[Tuple[float, ...]] = None
    origin: Optional[Tuple[float, ...]] = None
    reason: str = ""

    @property
    def is_image(self) -> bool:
        return self.size is not None

    def tag(self, keyword: str) -> str:
        return self.tags.get(keyword, "")

    @property
    def image_type(self) -> List[str]:
        return [v.strip().upper() for v in self.tag("ImageType").split("\\") if v.strip()]

    @property
    def frames(self) -> int:
        return int(self.size[2]) if self.size is not None and len(self.size) > 2 else 1


def is_dicom_file(path: Union[str, Path]) -> bool:
    """True if ``path`` starts with the DICOM file preamble (128 bytes, then ``DICM``)."""
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:] == b"DICM"
    except OSError:
        return False


def _sop_class(path: Path) -> str:
    """Media Storage SOP Class UID (0002,0002) from a DICOM file's meta header ('' if not found).

    The meta header (group 0002) is always explicit-VR little endian right after the preamble,
    so a few lines read it even when pydicom cannot parse the rest of the file.
    """
    with open(path, "rb") as f:
        head = f.read(4096)
    pos = 132
    while pos + 8 <= len(head) and int.from_bytes(head[pos:pos + 2], "little") == 0x0002:
        element, vr = int.from_bytes(head[pos + 2:pos + 4], "little"), head[pos + 4:pos + 6]
        if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN"):
            length, pos = int.from_bytes(head[pos + 8:pos + 12], "little"), pos + 12
        else:
            length, pos = int.from_bytes(head[pos + 6:pos + 8], "little"), pos + 8
        if element == 0x0002:
            return head[pos:pos + length].decode("ascii", "replace").strip("\0 ")
        pos += length
    return ""


def _pydicom_header(path: Path, keywords: Sequence[str]) -> Tuple[Dict[str, str], str]:
    """The tags of a DICOM file SimpleITK reads no image from, and what pydicom sees of it, e.g. ``"no pixel data"``.

    Large values (the pixel data) are not read (``defer_size``); pydicom's warnings about a damaged file
    are turned into the text returned.
    """
    import pydicom

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        level = logging.getLogger("pydicom").level
        logging.getLogger("pydicom").setLevel(logging.ERROR)
        try:
            ds = pydicom.dcmread(str(path), defer_size=1024, force=True)
        finally:
            logging.getLogger("pydicom").setLevel(level)
    tags = {}
    for kw in keywords:
        value = ds.get(kw)
        if value is None and kw == "SOPClassUID":  # a DICOMDIR has it in its meta header only
            value = getattr(ds, "file_meta", {}).get("MediaStorageSOPClassUID")
        if value is None:
            tags[kw] = ""
        elif isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
            tags[kw] = "\\".join(str(v) for v in value)
        else:
            tags[kw] = str(value).strip()
    damaged = [str(w.message) for w in caught if "end of file" in str(w.message).lower()]
    if damaged:
        seen = "damaged: the file ends early"
    elif any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        seen = (f"pixel data SimpleITK cannot decode{f' ({syntax.name})' if syntax is not None else ''}: damaged, "
                "or an encoding it does not read")
    else:
        seen = "no pixel data"
    return tags, seen


def read_header(path: Union[str, Path], keywords: Sequence[str] = BASE_KEYWORDS, *, dicom: bool = False
                ) -> Union[DicomFile, str]:
    """One file's DICOM header, or why ``path`` is not a DICOM file.

    SimpleITK reads the header of a file with an image (``ReadImageInformation``: no pixel data);
    a DICOM file without an image (a report, a DICOMDIR) is read by pydicom with ``stop_before_pixels``
    and comes back as a :class:`DicomFile` whose ``reason`` says what it is.

    Args:
        path: the file.
        keywords: DICOM keywords to keep (:data:`BASE_KEYWORDS` and a filter's).
        dicom: take the file as DICOM even without the file preamble (a DICOMDIR lists it).

    Returns:
        a :class:`DicomFile`, or a text saying why the file is not one (another image format, no image,
        unreadable).

    Example::

        >>> read_header("export/98892003/MR2/4950").tag("SeriesDescription")   # 'T/S/C RF FAST PILOT'
        >>> read_header("export/notes.txt")   # 'not an image SimpleITK or the DICOM reader can open'
    """
    import SimpleITK as sitk

    path = Path(path)
    keywords = tuple(dict.fromkeys((*BASE_KEYWORDS, *keywords)))
    try:
        with open(path, "rb") as f:
            is_dicom = dicom or f.read(132)[128:] == b"DICM"
    except OSError as e:
        return f"cannot be read: {e.strerror}"
    io = "GDCMImageIO" if is_dicom else sitk.ImageFileReader.GetImageIOFromFileName(str(path))
    if io != "GDCMImageIO":
        if io:
            return (f"a {io.replace('ImageIO', '')} image; only NIfTI files and DICOM series are taken as "
                    "inputs (convert it to .nii.gz)")
        return "not an image SimpleITK or the DICOM reader can open"
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.SetImageIO("GDCMImageIO")
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        try:
            tags, seen = _pydicom_header(path, keywords)
        except Exception as e:  # pydicom raises several types for a damaged file
            return f"a DICOM file that cannot be read ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        sop = tags.get("SOPClassUID") or _sop_class(path)
        tags["SOPClassUID"] = sop
        what = next((v for k, v in NON_IMAGE_SOP.items() if sop.startswith(k)), "")
        if what or (seen == "no pixel data" and not sop):
            reason = (f"a DICOM file without an image (no pixel data SimpleITK can read"
                      f"{f'; SOP class {sop}' if sop else ''}{f': {what}' if what else ''}); not an input")
        elif seen == "no pixel data":  # an image's SOP class: cut short, or written without its pixels
            reason = (f"a DICOM file without an image (no pixel data, though SOP class {sop} is an image's: "
                      "truncated, or not conformant); not an input")
        else:
            reason = f"a DICOM file whose image cannot be read ({seen}{f'; SOP class {sop}' if sop else ''}); skipped"
        return DicomFile(path, tags, reason=reason)

    def text(kw):
        key = _tag_key(kw)
        return reader.GetMetaData(key).strip("\0 ") if reader.HasMetaDataKey(key) else ""

    return DicomFile(path, {kw: text(kw) for kw in keywords}, tuple(reader.GetSize()), tuple(reader.GetDirection()),
                     tuple(reader.GetOrigin()))


class SeriesFilter:
    """Which DICOM series an input folder gives the bundle; the others are *not selected* (not an error).

    Args:
        spec: ``None``, ``""`` or ``{}``: every series. A text without ``{``: the Modality, or several
            separated by commas (``"MR"``, ``"MR,CT"``). A mapping (or its JSON text) of DICOM keywords to a
            pattern or a list of patterns: every keyword's value must match one of its patterns
            (shell-style ``*`` and ``?``, case-insensitive; for a multi-valued tag such as ImageType, the
            whole value or any one of its values), e.g. ``{"Modality": "MR", "SeriesDescription": "*T2*"}``.

    Raises:
        ValueError: a keyword that is not a DICOM keyword, or a spec of another type.

    Example::

        >>> f = SeriesFilter({"Modality": "MR", "SeriesDescription": ["*T2*", "*t2w*"]})
        >>> f.rejects({"Modality": "CT", "SeriesDescription": "Routine Brain"})
        "Modality 'CT' is not MR (series_filter Modality=MR; SeriesDescription=*T2*|*t2w*)"
        >>> f.rejects({"Modality": "MR", "SeriesDescription": "T2 TSE AX"}) is None
        True
    """

    def __init__(self, spec: Union[str, Mapping[str, Union[str, Sequence[str]]], None] = None):
        if isinstance(spec, SeriesFilter):
            self.patterns: Dict[str, Tuple[str, ...]] = dict(spec.patterns)
            return
        if isinstance(spec, str):
            text = spec.strip()
            if text.startswith("{"):
                try:
                    spec = json.loads(text)
                except json.JSONDecodeError as e:
                    raise ValueError(f"series_filter {spec!r} is not valid JSON: {e}") from None
            else:
                spec = {"Modality": [m.strip() for m in text.split(",") if m.strip()]} if text else {}
        if spec is None:
            spec = {}
        if not isinstance(spec, Mapping):
            raise ValueError(f"series_filter must be a modality (e.g. 'MR') or a mapping of DICOM keywords to "
                             f"patterns, not {type(spec).__name__} {spec!r}")
        self.patterns = {}
        for keyword, value in spec.items():
            _tag_key(str(keyword))  # refuses a misspelt keyword now, not after every header is read
            values = [value] if isinstance(value, str) else list(value)
            if not values or not all(isinstance(v, str) and v for v in values):
                raise ValueError(f"series_filter {keyword}: expected a pattern or a list of patterns, got {value!r}")
            self.patterns[str(keyword)] = tuple(values)

    @property
    def keywords(self) -> Tuple[str, ...]:
        return tuple(self.patterns)

    def __bool__(self) -> bool:
        return bool(self.patterns)

    def __str__(self) -> str:
        return "; ".join(f"{k}={'|'.join(v)}" for k, v in self.patterns.items()) or "every series"

    def rejects(self, tags: Mapping[str, str]) -> Optional[str]:
        """Why a series with these tags is not selected, or None when it is."""
        for keyword, patterns in self.patterns.items():
            value = str(tags.get(keyword, "") or "").strip()
            candidates = [value.upper()] + [v.strip().upper() for v in value.split("\\")]
            if not any(fnmatch.fnmatchcase(c, p.upper()) for c in candidates for p in patterns):
                wanted = " or ".join(patterns)
                verb = "is not" if keyword == "Modality" and not any(set(p) & set("*?[") for p in patterns) \
                    else "does not match"
                shown = repr(value) if value else "(absent)"
                return f"{keyword} {shown} {verb} {wanted} (series_filter {self})"
        return None


@dataclass
class Dicomdir:
    """What a DICOMDIR says: the files it lists (found on disk, case-insensitively), those missing, and
    why it could not be read (``error``; then nothing else is set)."""

    path: Path
    files: Dict[Path, Dict[str, str]] = field(default_factory=dict)  # found file -> its record's UIDs, Modality
    missing: List[Tuple[str, Dict[str, str]]] = field(default_factory=list)  # (File ID as listed, its UIDs)
    outside: List[str] = field(default_factory=list)  # File IDs pointing outside the DICOMDIR's folder
    descriptor: Optional[Path] = None  # the file-set's descriptor file (a README), if it names one
    error: str = ""


class _CaseInsensitive:
    """Find ``a/b/c`` as ``A/B/C`` (CDs are often copied with changed case) or with ISO 9660's ``;1`` version."""

    def __init__(self):
        self.listings: Dict[Path, Dict[str, str]] = {}

    def find(self, base: Path, parts: Sequence[str]) -> Optional[Path]:
        current = base
        for part in parts:
            if current not in self.listings:
                try:
                    self.listings[current] = {n.lower(): n for n in os.listdir(current)}
                except OSError:
                    return None
            names = self.listings[current]
            name = names.get(part.lower()) or names.get(part.lower() + ";1")
            if name is None:
                return None
            current = current / name
        return current if current.is_file() else None


def read_dicomdir(path: Union[str, Path], _finder: Optional[_CaseInsensitive] = None) -> Dicomdir:
    """The files a DICOMDIR lists, with pydicom's ``FileSet``; a record whose file is not there is *missing*.

    Each found file is given with the UIDs its record holds (``SOPInstanceUID``, ``SeriesInstanceUID``,
    ``Modality``), so the caller can check them against the file's own header. A file listed as
    ``IM000001`` is found as ``im000001`` or ``IM000001;1`` too.

    Example::

        >>> d = read_dicomdir("export/DICOMDIR")
        >>> len(d.files), d.missing   # (31, [])
    """
    import pydicom
    from pydicom.fileset import FileSet

    path = Path(path)
    finder = _finder or _CaseInsensitive()
    out = Dicomdir(path)
    pydicom_log = logging.getLogger("pydicom")
    level = pydicom_log.level
    try:
        # pydicom warns (and logs) for each record whose file is missing and for a non-standard layout;
        # this function reports the missing files itself, once, with the DICOMDIR named
        pydicom_log.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(str(path))
            fs = FileSet(ds)
    except Exception as e:  # pydicom raises ValueError, KeyError, AttributeError ... for a damaged index
        out.error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        return out
    finally:
        pydicom_log.setLevel(level)
    try:
        root = Path(fs.path) if fs.path else path.parent.resolve()
        descriptor = ds.get("FileSetDescriptorFileID")
        if descriptor:
            parts = [descriptor] if isinstance(descriptor, str) else list(descriptor)
            out.descriptor = finder.find(path.parent, parts)
        # the records of missing files are dropped from the FileSet's instances, not from its record tree:
        # walk the tree from any instance's root node to see every record
        nodes = [inst.node.root for inst in fs][:1]
        leaves = []
        while nodes:
            node = nodes.pop()
            if node.has_instance and not node.children:
                leaves.append(node.instance)
            nodes.extend(reversed(node.children))
        if not leaves:  # no listed file exists (or none is listed): read the File IDs from the records
            for record in ds.get("DirectoryRecordSequence", []):
                if "ReferencedFileID" in record:
                    value = record.ReferencedFileID
                    file_id = "/".join([value] if isinstance(value, str) else list(value))
                    out.missing.append((file_id, {"SOPInstanceUID": str(record.get("ReferencedSOPInstanceUIDInFile",
                                                                                   ""))}))
            return out
        for inst in leaves:
            try:
                rel = Path(inst.path).relative_to(root)
            except (ValueError, PermissionError):
                out.outside.append(str(inst.path))
                continue
            uids = {}
            for kw in ("SOPInstanceUID", "SeriesInstanceUID", "Modality"):
                try:
                    uids[kw] = str(inst[kw].value)
                except (KeyError, AttributeError):
                    uids[kw] = ""
            found = path.parent / rel
            if not found.is_file():
                found = finder.find(path.parent, rel.parts)
            if found is None:
                out.missing.append((rel.as_posix(), uids))
            else:
                out.files[found] = uids
    finally:
        stage = getattr(fs, "_stage", {}).get("t")  # FileSet stages writes in a temporary folder; nothing is written
        if stage is not None:
            stage.cleanup()
    return out


def sort_stack(files: Sequence[DicomFile]) -> List[DicomFile]:
    """Slices in order along their slice direction (then by name), as a volume is stacked."""
    if len(files) < 2:
        return list(files)
    normal = np.asarray(files[0].direction).reshape(3, 3)[:, 2]
    return sorted(files, key=lambda f: (round(float(np.dot(f.origin, normal)), 4), f.path.name))


def stack_problem(slices: Sequence[DicomFile]) -> Optional[str]:
    """Why the images of one stack (one series, one orientation) are not one regular volume (None if they are):
    different sizes, several multi-frame files, slices at the same position (several volumes), or a gap."""
    if len(slices) == 1:
        return None
    sizes = sorted({tuple(f.size) for f in slices})
    if len(sizes) > 1:
        return f"the DICOM files of one series differ in size {sizes}; skipped"
    if len(sizes[0]) > 2 and sizes[0][2] > 1:
        return f"{len(slices)} multi-frame DICOM files in one series; skipped (one multi-frame file is a series)"
    directions = np.array([f.direction for f in slices])
    if not np.allclose(directions, directions[0], atol=1e-4):
        return "the slices of one series have different orientations; skipped"
    normal = directions[0].reshape(3, 3)[:, 2]
    ordered = sort_stack(slices)
    positions = np.array([np.dot(f.origin, normal) for f in ordered])
    names = [f.path.name for f in ordered]
    steps = np.diff(positions)
    step = float(np.median(steps))
    same = np.flatnonzero(steps < 1e-3)
    if same.size:
        i = same[0]
        return (f"{same.size} slice(s) at the same position as another ({names[i]} and {names[i + 1]} at "
                f"{positions[i]:.2f} mm): several volumes (time points, echoes) in one series; skipped")
    uneven = np.flatnonzero(np.abs(steps - step) > 0.01 * step + 1e-3)
    if uneven.size:
        i = uneven[0]
        missing = int(round(steps[i] / step)) - 1
        return (f"slice positions are not evenly spaced: {steps[i]:.2f} mm between {names[i]} and {names[i + 1]} "
                f"(at {positions[i]:.2f} and {positions[i + 1]:.2f} mm along the slice normal) where the other "
                f"slices are {step:.2f} mm apart"
                + (f"; {missing} slice(s) missing there" if missing >= 1 else "")
                + (f" ({uneven.size} uneven steps in all)" if uneven.size > 1 else "") + "; skipped")
    return None


@dataclass
class SeriesVerdict:
    """What :func:`split_series` decided: ``status`` (:data:`SELECTED`, :data:`NOT_SELECTED`, :data:`SKIPPED`,
    or :data:`NO_IMAGE` for a series of files without an image), the reason (for all but selected), the main
    stack in slice order, and what was dropped from it (text; '' when nothing)."""

    status: str
    reason: str = ""
    stack: List[DicomFile] = field(default_factory=list)
    dropped: str = ""
    dropped_files: List[DicomFile] = field(default_factory=list)


def _names(files: Sequence[DicomFile], root: Optional[Path], at_most: int = 3) -> str:
    def name(f):
        if root is not None:
            try:
                return f.path.relative_to(root).as_posix()
            except ValueError:
                pass
        return f.path.name
    shown = ", ".join(name(f) for f in files[:at_most])
    return shown + (f" and {len(files) - at_most} more" if len(files) > at_most else "")


def _orientation_groups(files: Sequence[DicomFile]) -> List[List[DicomFile]]:
    """Images grouped by orientation (their row and column directions), largest group first."""
    groups: List[Tuple[np.ndarray, List[DicomFile]]] = []
    for f in files:
        axes = np.asarray(f.direction, dtype=float).reshape(3, 3)[:, :2]
        for ref, members in groups:
            if np.allclose(axes, ref, atol=_ORIENTATION_TOL):
                members.append(f)
                break
        else:
            groups.append((axes, [f]))
    return sorted((m for _, m in groups), key=len, reverse=True)


def split_series(files: Sequence[DicomFile], selection: Optional[SeriesFilter] = None,
                 root: Optional[Path] = None) -> SeriesVerdict:
    """Decide what one series (its files, any order) gives: a main stack, or why not.

    In this order:

    1. the ``selection`` (:class:`SeriesFilter`) rejects it: *not selected* (e.g. a CT series for an MR bundle);
    2. no file has an image (reports, presentation states): :data:`NO_IMAGE`, each file keeps its reason;
    3. a localizer series (its SeriesDescription says localizer, scout, survey, pilot or loc; or every
       image's ImageType says LOCALIZER) or derived projection images (ImageType PROJECTION IMAGE, e.g.
       MIPs): *not selected*, named;
    4. images whose ImageType says LOCALIZER are dropped from the series and named;
    5. the other images are grouped by orientation: the largest group is the main stack if it holds more
       images than all other groups together, and the others are dropped as localizers and named;
       otherwise (a 3-plane localizer, two stacks in one series) the series is *skipped*, named;
    6. the main stack must be one regular volume (:func:`stack_problem`): a gap, slices at one position or
       different sizes *skip* the series, named.

    Args:
        files: the series' files (from :func:`read_header`).
        selection: which series to take (None: every series).
        root: folder the file names in the reasons are given relative to.

    Example::

        >>> v = split_series(headers, SeriesFilter("MR"))
        >>> v.status, len(v.stack), v.dropped   # ('selected', 20, '1 localizer image (ImageType LOCALIZER): IM0000')
    """
    images = [f for f in files if f.is_image]
    first = images[0] if images else files[0]
    if selection:
        why = selection.rejects(first.tags)
        if why:
            return SeriesVerdict(NOT_SELECTED, f"not selected: {why}")
    if not images:
        return SeriesVerdict(NO_IMAGE, files[0].reason)
    description = first.tag("SeriesDescription")
    if description and LOCALIZER_DESCRIPTION.search(description):
        return SeriesVerdict(NOT_SELECTED, f"not selected: a localizer (SeriesDescription {description!r}), "
                                           f"{len(images)} image(s)")
    marked = [f for f in images if "LOCALIZER" in f.image_type]
    if len(marked) == len(images):
        return SeriesVerdict(NOT_SELECTED, f"not selected: a localizer series ({len(images)} image(s) with "
                                           "ImageType LOCALIZER)")
    if all("PROJECTION IMAGE" in f.image_type for f in images):
        return SeriesVerdict(NOT_SELECTED, f"not selected: {len(images)} derived projection image(s) (ImageType "
                                           f"{first.tag('ImageType')!r}, e.g. MIPs), not an acquired volume")
    dropped, notes = list(marked), []
    if marked:
        notes.append(f"{len(marked)} localizer image(s) (ImageType LOCALIZER): {_names(marked, root)}")
    rest = [f for f in images if f not in marked]
    groups = _orientation_groups(rest)
    if len(groups) > 1:
        main, others = groups[0], [f for g in groups[1:] for f in g]
        counts = " + ".join(str(len(g)) for g in groups)
        if len(main) <= len(others):
            return SeriesVerdict(SKIPPED, f"{len(rest)} images in {len(groups)} orientations ({counts}) and none "
                                          "holds most of them: no main stack (a 3-plane localizer, or several "
                                          "stacks in one series); skipped")
        dropped += others
        notes.append(f"{len(others)} image(s) in {len(groups) - 1} other orientation(s) than the main stack of "
                     f"{len(main)} (localizers): {_names(others, root)}")
        rest = main
    problem = stack_problem(rest)
    if problem:
        return SeriesVerdict(SKIPPED, problem, dropped="; ".join(notes), dropped_files=dropped)
    return SeriesVerdict(SELECTED, stack=sort_stack(rest), dropped="; ".join(notes), dropped_files=dropped)


def series_summary(first: DicomFile, files: int, folders: Iterable[str], dropped: str = "",
                   dicomdir: str = "") -> Dict[str, str]:
    """The flat, text-only record of a series that travels with its input into ``inference_summary.json``:
    patient, study and series identity (full UIDs), how many files, where, and what was dropped."""
    return {"patient_id": first.tag("PatientID"), "study_uid": first.tag("StudyInstanceUID"),
            "study_description": first.tag("StudyDescription"), "study_date": first.tag("StudyDate"),
            "series_uid": first.tag("SeriesInstanceUID"), "series_number": first.tag("SeriesNumber"),
            "series_description": first.tag("SeriesDescription"), "modality": first.tag("Modality"),
            "files": str(files), "folders": "; ".join(sorted(set(folders))), "dropped": dropped,
            "dicomdir": dicomdir}
