"""Scans as hospitals store them: a SimpleITK reader for MONAI, DICOM series, and a folder scan.

* :class:`SimpleITKReader` reads NIfTI, MetaImage, NRRD, single DICOM files, folders holding
  one DICOM series and the files of one DICOM series, and returns them exactly as MONAI's
  ``NibabelReader`` returns a NIfTI file (array ``(x, y, z)``, RAS ``affine``), so the same
  transforms, ``Invertd`` and ``SaveImaged`` work on either.
* :func:`find_inputs` scans a folder handed over by a hospital: every NIfTI volume and every DICOM
  series (grouped by series wherever its files lie, localizers dropped, a DICOMDIR read:
  :mod:`fedharmony.data.dicom`) is an input; everything else is named with the reason it cannot be
  used, or listed as not selected (a series of another modality, a localizer).
* :func:`convert_to_nifti` writes one image (e.g. a DICOM series) as NIfTI, atomically.

No NVFlare import. Example::

    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged
    from fedharmony.data.images import SimpleITKReader, find_inputs

    inputs, problems = find_inputs("/data/hospital_export", exclude=["/data/hospital_export/predictions"],
                                   series_filter="MR")
    for p in problems:
        print(f"{p.get('status', 'skipped')} {p['input']}: {p['reason']}")
    load = Compose([LoadImaged(keys="image", reader=SimpleITKReader(), image_only=True),
                    EnsureChannelFirstd(keys="image")])
    image = load(inputs[0])["image"]  # MetaTensor (1, x, y, z), image.affine in RAS

In a bundle config: ``{"_target_": "LoadImaged", "keys": "image", "reader":
"$fedharmony.data.images.SimpleITKReader()"}`` with ``"$import fedharmony.data.images"`` in ``imports``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
from monai.data import ImageReader
from monai.data.image_reader import _copy_compatible_dict, _stack_images  # the stacking ITKReader uses
from monai.data.utils import orientation_ras_lps
from monai.utils import ImageMetaKey, MetaKeys, SpaceKeys

from fedharmony.core.files import DATALIST_NAME, SITE_MAP_NAME

__all__ = ["SimpleITKReader", "find_inputs", "attach_labels", "convert_to_nifti", "dicom_stack"]


class _SimpleITK:
    """SimpleITK, imported at its first use: a folder of NIfTI files (read by nibabel) needs none, so the bundle's
    inference configs run where SimpleITK (a 50 MB wheel) is not installed; DICOM and other formats need it."""

    def __getattr__(self, name):
        import SimpleITK

        return getattr(SimpleITK, name)


sitk = _SimpleITK()

PathLike = Union[str, Path]

# file endings SimpleITKReader claims in LoadImage's automatic reader choice; scanners often write
# DICOM files without any ending, and a folder is read as a DICOM series
_SUFFIXES = (".nii", ".nii.gz", ".mha", ".mhd", ".nrrd", ".nhdr", ".dcm", ".dicom", ".ima")
_NIFTI_RE = re.compile(r"\.nii(\.gz)?$", re.IGNORECASE)
_MASK_RE = re.compile(r"_(segmentation|seg)(\.nii(\.gz)?)?$", re.IGNORECASE)  # masks are not inputs
_IGNORED_NAMES = {DATALIST_NAME, SITE_MAP_NAME}
_DATALIST_RE = re.compile(r"^datalist_[A-Za-z0-9]+\.json$")  # another label set's datalist (datalist_tissue.json)


def dicom_stack(names: Sequence[PathLike]) -> Optional[List[str]]:
    """``names`` in slice order when they are the single-frame DICOM images of one series, else None.

    This is how a series that shares its folder with others (or lies in several folders) is given to
    :class:`SimpleITKReader`: as the list of its files, which :func:`find_inputs` puts in an input's
    ``image``. Two or more files are needed; only their headers are read.

    Raises:
        ValueError: the files are one series but not one regular stack (several orientations, sizes, a
            gap ...): reading them as a volume would give a wrong geometry.

    Example::

        >>> dicom_stack(["export/IM3", "export/IM1", "export/IM2"])   # ['export/IM1', 'export/IM2', 'export/IM3']
        >>> dicom_stack(["a.nii.gz", "b.nii.gz"]) is None              # not DICOM: channels, as MONAI stacks them
        True
    """
    from fedharmony.data.dicom import DicomFile, read_header, sort_stack, stack_problem

    if len(names) < 2:
        return None
    paths = [Path(n) for n in names]
    if any(_NIFTI_RE.search(p.name) or not p.is_file() for p in paths):
        return None
    headers = [read_header(p) for p in paths]
    if not all(isinstance(h, DicomFile) and h.is_image and h.frames == 1 for h in headers):
        return None
    uids = {h.tag("SeriesInstanceUID") for h in headers}
    if len(uids) != 1:
        return None
    problem = stack_problem(headers)
    if problem:
        raise ValueError(f"{len(paths)} DICOM files of series {uids.pop() or '(no series UID)'} "
                         f"({paths[0].parent}/...): {problem}")
    return [str(h.path) for h in sort_stack(headers)]


def _read_sitk(path: Union[PathLike, Sequence[PathLike]], series_name: str = "", **kwargs) -> sitk.Image:
    """One ``sitk.Image`` from a file, a folder holding one DICOM series, or the files of one DICOM series
    (:func:`dicom_stack`); ``kwargs``: for ``sitk.ReadImage``."""
    if isinstance(path, (list, tuple)):
        files = dicom_stack(path)
        if files is None:
            raise ValueError(f"{len(path)} files ({', '.join(str(p) for p in list(path)[:3])}"
                             f"{' ...' if len(path) > 3 else ''}) are not the single-frame DICOM images of one series")
        return sitk.ReadImage(files, **kwargs)
    path = str(path)
    if not Path(path).is_dir():
        return sitk.ReadImage(path, **kwargs)
    ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(path)
    if not ids:
        raise FileNotFoundError(f"no DICOM series in folder {path}")
    if series_name and series_name not in ids:
        raise ValueError(f"{path} has no DICOM series {series_name!r}; it has {list(ids)}")
    if not series_name and len(ids) > 1:
        # ITKReader warns and takes the first; reading the wrong scan silently is worse than stopping
        raise ValueError(f"{path} holds {len(ids)} DICOM series {list(ids)}; pass series_name= "
                         "or the series' files (fedharmony.data.images.find_inputs splits a folder by series)")
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(path, series_name or ids[0])
    return sitk.ReadImage(list(files), **kwargs)


class SimpleITKReader(ImageReader):
    """Load images with SimpleITK, in MONAI's ``NibabelReader`` / ``ITKReader`` conventions.

    Reads anything ``sitk.ReadImage`` reads (``.nii``, ``.nii.gz``, ``.mha``, ``.nrrd``, a single
    DICOM file), a folder holding one DICOM series, and a list of the files of one DICOM series
    (single-frame images, any order: read as one volume, see :func:`dicom_stack`; any other list is
    stacked as channels, MONAI's convention). The array is SimpleITK's reversed, i.e.
    ``(x, y, z)`` for a 3-D volume, the same axis order ``NibabelReader`` gives for a NIfTI file
    (``ITKReader``'s default, ``reverse_indexing=False``). Several volumes (a 4-D NIfTI:
    ``(x, y, z, t)``; a multi-component image: ``(x, y, z, c)``) are all kept, with
    ``original_channel_dim = -1``, so ``EnsureChannelFirst`` makes them ``(t or c, x, y, z)``.

    The meta dict has ``affine`` and ``original_affine`` (RAS, from SimpleITK's LPS direction,
    spacing and origin exactly as ``ITKReader`` converts them), ``spatial_shape``, ``spacing``,
    ``original_channel_dim`` (``nan``, MONAI's "no channel", for one volume), ``space`` and
    ``filename_or_obj``. DICOM tags are not copied (they hold patient data).

    Args:
        channel_dim: the channel dimension of the array, if known (as in ``ITKReader``);
            ``None``: "no_channel" for a 3-D volume, ``-1`` when there are more volumes.
        series_name: the DICOM series instance UID to read when a folder holds several series;
            without it such a folder is an error (never silently the first series).
        affine_lps_to_ras: convert the affine to RAS (``True``, as ``NibabelReader``) or keep LPS.
        kwargs: passed to ``sitk.ReadImage``, e.g. ``outputPixelType=sitk.sitkFloat32``.

    Example::

        >>> reader = SimpleITKReader()
        >>> array, meta = reader.get_data(reader.read("Case00/"))  # a DICOM series folder
        >>> array.shape, meta["space"]  # ((x, y, z), 'RAS')
        >>> array, meta = reader.get_data(reader.read(["export/IM7", "export/IM2", "export/IM4"]))  # one series
    """

    def __init__(self, channel_dim: Union[str, int, None] = None, series_name: str = "",
                 affine_lps_to_ras: bool = True, **kwargs):
        super().__init__()
        self.channel_dim = float("nan") if channel_dim == "no_channel" else channel_dim
        self.series_name = series_name
        self.affine_lps_to_ras = affine_lps_to_ras
        self.kwargs = kwargs
        self.filenames: Tuple[str, ...] = ()

    def verify_suffix(self, filename: Union[Sequence[PathLike], PathLike]) -> bool:
        """True for folders (DICOM series), the endings SimpleITK reads, files without an ending and files with
        the DICOM preamble (exports often name files by their UID: ``1.2.840....137``)."""
        from fedharmony.data.dicom import is_dicom_file

        names = [filename] if isinstance(filename, (str, Path)) else list(filename)
        return all(Path(n).is_dir() or str(n).lower().endswith(_SUFFIXES) or not Path(n).suffix
                   or is_dicom_file(n) for n in names)

    def read(self, data: Union[Sequence[PathLike], PathLike], **kwargs):
        """``sitk.Image`` (or a list of them for several paths, stacked as channels by :meth:`get_data`).

        Args:
            data: a file, a DICOM series folder, the files of one DICOM series, or a list of files / folders
                (stacked as channels).
            kwargs: for ``sitk.ReadImage``; override the constructor's.
        """
        names = [data] if isinstance(data, (str, Path)) else list(data)
        kwargs_ = {**self.kwargs, **kwargs}
        stack = dicom_stack(names)
        if stack is not None:
            self.filenames = (stack[0],)  # one volume: named by its first slice, as MONAI names a list
            return sitk.ReadImage(stack, **kwargs_)
        self.filenames = tuple(str(n) for n in names)  # for filename_or_obj, as NibabelReader keeps them
        images = [_read_sitk(n, self.series_name, **kwargs_) for n in names]
        return images if len(images) > 1 else images[0]

    def get_data(self, img) -> Tuple[np.ndarray, dict]:
        """The array (``(x, y, z)``, ``(x, y, z, c)`` ...) and MONAI meta dict of ``img`` (one image or a list)."""
        images = list(img) if isinstance(img, (list, tuple)) else [img]  # a sitk.Image is itself iterable
        names = self.filenames if len(self.filenames) == len(images) else ("",) * len(images)
        arrays, meta = [], {}
        for image, name in zip(images, names):
            data = sitk.GetArrayFromImage(image)  # (z, y, x) or (z, y, x, c) or (t, z, y, x)
            data = data.T if image.GetNumberOfComponentsPerPixel() == 1 else np.moveaxis(data.T, 0, -1)
            header = {"spacing": np.asarray(image.GetSpacing())}
            header[MetaKeys.ORIGINAL_AFFINE] = _affine(image, self.affine_lps_to_ras)
            header[MetaKeys.AFFINE] = header[MetaKeys.ORIGINAL_AFFINE].copy()
            header[MetaKeys.SPACE] = SpaceKeys.RAS if self.affine_lps_to_ras else SpaceKeys.LPS
            size = list(image.GetSize())
            if isinstance(self.channel_dim, int):
                size.pop(self.channel_dim)
            header[MetaKeys.SPATIAL_SHAPE] = np.asarray(size[:min(image.GetDimension(), 3)])
            if self.channel_dim is None:
                header[MetaKeys.ORIGINAL_CHANNEL_DIM] = (
                    float("nan") if data.ndim == len(header[MetaKeys.SPATIAL_SHAPE]) else -1)
            else:
                header[MetaKeys.ORIGINAL_CHANNEL_DIM] = self.channel_dim
            header[ImageMetaKey.FILENAME_OR_OBJ] = name
            arrays.append(data)
            _copy_compatible_dict(header, meta)
        return _stack_images(arrays, meta), meta


def _affine(image: sitk.Image, lps_to_ras: bool = True) -> np.ndarray:
    """The (spatial rank + 1)-square affine of ``image``, as ``ITKReader._get_affine`` builds it."""
    dim = image.GetDimension()
    direction = np.asarray(image.GetDirection()).reshape(dim, dim)
    spacing, origin = np.asarray(image.GetSpacing()), np.asarray(image.GetOrigin())
    sr = min(dim, 3)
    affine = np.eye(sr + 1)
    affine[:sr, :sr] = direction[:sr, :sr] @ np.diag(spacing[:sr])
    affine[:sr, -1] = origin[:sr]
    return orientation_ras_lps(affine) if lps_to_ras else affine


def convert_to_nifti(source: Union[PathLike, Sequence[PathLike]], out_path: PathLike, *, overwrite: bool = False
                     ) -> Path:
    """Write ``source`` (a DICOM series folder, the files of one series, or any file SimpleITK reads) as NIfTI.

    The voxels and geometry (spacing, origin, direction) are SimpleITK's; the file is written to a
    hidden temporary name and renamed, so a crash never leaves half a file under ``out_path``.

    Raises:
        FileExistsError: ``out_path`` exists and ``overwrite`` is False.
        ValueError, RuntimeError: ``source`` cannot be read (e.g. a folder with several series).

    Example::

        >>> convert_to_nifti("site/Case00", "site/Case00.nii.gz")
    """
    out = Path(out_path)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; not overwritten")
    image = _read_sitk(source)
    tmp = out.with_name(f".tmp-{os.getpid()}-{out.name}")  # keeps the .nii.gz ending SimpleITK picks the writer by
    try:
        sitk.WriteImage(image, str(tmp))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def find_inputs(folder: PathLike, *, recursive: bool = True, exclude: Union[PathLike, Iterable[PathLike], None] = None,
                series_filter: Union[str, Mapping, None] = None) -> Tuple[List[dict], List[dict]]:
    """Scan a folder as a hospital hands it over: what can be segmented, and why the rest cannot.

    Inputs are NIfTI files (``.nii``, ``.nii.gz``; masks named ``*_segmentation.nii*`` or ``*_seg.nii*``
    are not inputs) and DICOM series. Every DICOM file under ``folder`` is grouped by its
    SeriesInstanceUID wherever it lies (one folder per series, many series in one folder, a series
    spread over folders), and each series is one input, decided by
    :func:`fedharmony.data.dicom.split_series`: series the ``series_filter`` does not take, localizer
    series and projection images are *not selected*; localizer images and images in a minority
    orientation are dropped from a series and named; a series without a regular main stack (a gap,
    slices at one position) is skipped and named. A DICOMDIR is read (pydicom's ``FileSet``): the files
    it lists are found even without the DICOM preamble or with changed letter case, its records are
    checked against the files' own UIDs, and files it lists that are missing are named (and their series
    skipped as incomplete). DICOM files in a sub-folder named like a mask (``Case00_segmentation/``) are
    not inputs. Only names and file headers are read (SimpleITK's ``ReadImageInformation``; pydicom
    without pixel data for files without an image): a corrupt NIfTI or pixel data is found when loaded.

    Args:
        folder: the folder to scan.
        recursive: also scan sub-folders (otherwise each sub-folder is reported as not searched; files
            a DICOMDIR in ``folder`` lists are read all the same).
        exclude: folders (e.g. the output folder) or files to leave out, with everything under them.
        series_filter: which DICOM series to take (:class:`fedharmony.data.dicom.SeriesFilter`): None or
            ``""`` every series; ``"MR"`` the modality; ``{"Modality": "MR", "SeriesDescription": "*T2*"}``
            (or its JSON text) DICOM keywords and patterns. NIfTI files have no tags and are always taken.

    Returns:
        inputs: sorted by ``input`` (else ``image``), each ``{"image": ..., "name": ...}``: ``image`` is a
            NIfTI path, a folder holding one DICOM series and nothing else (read whole, as before), or the
            sorted list of a series' files (:func:`dicom_stack`; then ``input`` names the series). DICOM
            inputs also carry ``series``: the series' identity as text (patient ID, study and series UIDs,
            descriptions, number, modality, file count, folders, what was dropped, the DICOMDIR), for the
            inference summary. ``name`` is unique and filesystem-safe and names the mask
            (``<name>_seg.nii.gz``): a NIfTI file's stem; a series alone in its folder: the folder's path
            relative to ``folder`` joined with ``_``; any other series: patient ID, study description (or
            date), ``S`` + series number, series description and the last digits of its UID
            (``98890234_Brain_S2_T2_AX_480136``).
        problems: ``[{"input": str, "reason": text}]`` for everything else found, plus ``status`` when it is
            not an error: ``"not selected"`` (a series this bundle does not take: another modality, a
            localizer) or ``"note"`` (a DICOMDIR read, a file it lists whose UIDs differ); series records
            carry ``series`` too. A series alone in its folder is named by the folder, any other by
            ``patient / study / series N 'description' (UID)``. Hidden files, ``datalist.json`` (and another
            label set's ``datalist_<name>.json``) and ``sites.json`` are ignored silently.

    Raises:
        FileNotFoundError: ``folder`` does not exist or is not a folder.
        ValueError: ``series_filter`` names something that is not a DICOM keyword.

    Example::

        >>> inputs, problems = find_inputs("export", series_filter="MR")
        >>> inputs    # [{'image': 'export/Case00.nii.gz', 'name': 'Case00'},
        ...           #  {'image': 'export/MR/T2', 'name': 'MR_T2', 'series': {...}},
        ...           #  {'image': ['export/CD/IM1', ...], 'input': "98890234 / Brain / series 2 'T2 AX' (1.2...)",
        ...           #   'name': '98890234_Brain_S2_T2_AX_480136', 'series': {...}}]
        >>> problems   # [{'input': 'export/CT/5', 'reason': "not selected: Modality 'CT' is not MR ...",
        ...            #   'status': 'not selected', 'series': {...}}, ...]
    """
    from fedharmony.data.dicom import (BASE_KEYWORDS, DICOMDIR_SOP_CLASS, NO_IMAGE, NOT_SELECTED, SELECTED,
                                       SKIPPED, DicomFile, SeriesFilter, SeriesVerdict, _CaseInsensitive,
                                       read_dicomdir, read_header, series_summary, split_series)

    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"input folder not found: {root}" if not root.exists()
                                else f"input is not a folder: {root}")
    selection = SeriesFilter(series_filter)
    keywords = (*BASE_KEYWORDS, *selection.keywords)
    if exclude is None:
        exclude = []
    excluded = {Path(p).resolve() for p in ([exclude] if isinstance(exclude, (str, Path)) else exclude)}
    found: List[Tuple[dict, Tuple[str, ...]]] = []  # (input item without its name, name parts)
    problems: Dict[str, Dict[str, str]] = {}  # by input: a file re-read because a DICOMDIR lists it replaces its record
    dicom: Dict[Path, DicomFile] = {}
    dicomdirs: List[Path] = []
    seen = set()  # files the walk read a header of

    def problem(path, reason, **extra):
        problems[str(path)] = {"input": str(path), "reason": reason, **extra}

    def unlistable(e: OSError):
        problem(e.filename, f"cannot list the folder: {e.strerror}")

    def in_mask_folder(path: Path) -> bool:  # a mask stored as a DICOM series is no input
        return path.parent != root and bool(_MASK_RE.search(path.parent.name))

    def take(path: Path, header: Union[DicomFile, str]):
        if isinstance(header, str):
            problem(path, header)
        elif path.name.upper() == "DICOMDIR" or (not header.is_image
                                                 and header.tag("SOPClassUID") == DICOMDIR_SOP_CLASS):
            dicomdirs.append(path)
        elif not in_mask_folder(path):
            dicom[path] = header

    for here, dirs, files in os.walk(root, onerror=unlistable):
        here = Path(here)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and (here / d).resolve() not in excluded)
        if not recursive:
            for d in dirs:
                problem(here / d, "a sub-folder; not searched (recursive=False)")
            dirs[:] = []
        rel = here.relative_to(root).parts
        for name in sorted(files):
            path = here / name
            if name.startswith(".") or name in _IGNORED_NAMES or _DATALIST_RE.match(name) or path.resolve() in excluded:
                continue
            if _NIFTI_RE.search(name):
                if not _MASK_RE.search(name):
                    found.append(({"image": str(path)}, rel + (_NIFTI_RE.sub("", name),)))
                continue
            if name.upper() == "DICOMDIR":  # an index, no image: read below with pydicom
                dicomdirs.append(path)
                continue
            seen.add(path)
            take(path, read_header(path, keywords))

    # DICOMDIRs: the files they list (a listed file the walk could not take as DICOM, or did not see, is read now)
    finder = _CaseInsensitive()
    listed: Dict[Path, Tuple[Path, Dict[str, str]]] = {}
    missing: Dict[str, List[str]] = {}  # series UID -> File IDs listed but not there
    indexes = []
    for index in dicomdirs:
        record = read_dicomdir(index, finder)
        if record.error:
            problem(index, f"a DICOMDIR (an index of the files on a CD) that cannot be read ({record.error}); the "
                           "files beside it are read without it")
            continue
        indexes.append(record)
        for path, uids in record.files.items():
            resolved = path.resolve()
            if any(resolved == e or e in resolved.parents for e in excluded):
                continue
            listed.setdefault(path, (index, uids))
            if path not in dicom and (path not in seen or str(path) in problems):
                problems.pop(str(path), None)
                seen.add(path)
                take(path, read_header(path, keywords, dicom=True))
        for file_id, uids in record.missing:
            missing.setdefault(uids.get("SeriesInstanceUID", ""), []).append(file_id)
    notes: List[Dict[str, str]] = []
    for record in indexes:
        index = record.path
        said = f"lists {len(record.files) + len(record.missing)} file(s)"
        if record.descriptor is not None and problems.pop(str(record.descriptor), None):
            said += f" and {record.descriptor.name} as the file-set's descriptor"
        issues = []
        if record.missing:
            shown = ", ".join(f for f, _ in record.missing[:3]) + (" ..." if len(record.missing) > 3 else "")
            issues.append(f"{len(record.missing)} of them are not in the folder ({shown}): the copy is incomplete, "
                          "their series are skipped")
        if record.outside:
            issues.append(f"{len(record.outside)} of them lie outside its own folder "
                          f"({', '.join(record.outside[:3])}); not read")
        unlisted = [p for p in dicom if index.parent in p.parents and p not in listed]
        if unlisted:
            said += (f"; {len(unlisted)} DICOM file(s) under its folder are in no DICOMDIR (used all the same: "
                     f"{', '.join(str(p.relative_to(index.parent)) for p in unlisted[:3])}"
                     f"{' ...' if len(unlisted) > 3 else ''})")
        if issues:
            problem(index, f"a DICOMDIR that {said}; " + "; ".join(issues))
        else:
            notes.append({"input": str(index), "status": "note",
                          "reason": f"DICOMDIR read: {said}" + ("; all found" if record.files else "")})
    for path, (index, uids) in listed.items():
        header = dicom.get(path)
        if header is not None and uids.get("SOPInstanceUID") and header.tag("SOPInstanceUID") \
                and uids["SOPInstanceUID"] != header.tag("SOPInstanceUID"):
            notes.append({"input": str(path), "status": "note",
                          "reason": f"{index} lists this file as SOP instance {uids['SOPInstanceUID']}, the file holds "
                                    f"{header.tag('SOPInstanceUID')}: the index does not match the files; the file's "
                                    "own header is used"})

    # series: grouped by UID wherever their files lie
    by_series: Dict[str, List[DicomFile]] = {}
    folder_series: Dict[Path, set] = {}  # folder -> the series with an image in it
    for path in sorted(dicom):
        header = dicom[path]
        uid = header.tag("SeriesInstanceUID")
        by_series.setdefault(uid, []).append(header)
        if header.is_image:
            folder_series.setdefault(path.parent, set()).add(uid)
    for uid, files in by_series.items():
        verdict = split_series(files, selection, root)
        first = next((f for f in files if f.is_image), files[0])
        folders = sorted({f.path.parent for f in files})
        alone = len(folders) == 1 and folder_series.get(folders[0], set()) <= {uid}
        if uid in missing and verdict.status == SELECTED:
            lost = missing[uid]
            verdict = SeriesVerdict(SKIPPED, f"incomplete: the DICOMDIR lists {len(lost)} more file(s) of this series "
                                             f"that are not in the folder ({', '.join(lost[:3])}"
                                             f"{' ...' if len(lost) > 3 else ''}); skipped", dropped=verdict.dropped)
        index = next((listed[f.path][0] for f in files if f.path in listed), None)
        details = series_summary(first, len(files), [_relative(d, root) for d in folders], verdict.dropped,
                                 str(index) if index is not None else "")
        if not first.is_image:  # files without an image (a report): named by the file when there is one
            alone = False
        label = (str(folders[0]) if alone else str(files[0].path) if len(files) == 1 and not first.is_image
                 else _series_label(first))
        if verdict.status == NO_IMAGE:  # reports, presentation states: named as files, a series of them at once
            if len(files) == 1:
                problem(label, first.reason, series=details)
            elif len({f.reason for f in files}) == 1:
                problem(label, f"{len(files)} files of one series, each {files[0].reason}", series=details)
            else:
                for f in files:
                    problem(f.path, f.reason)
        elif verdict.status == NOT_SELECTED:
            problem(label, verdict.reason, status=NOT_SELECTED, series=details)
        elif verdict.status == SKIPPED:
            problem(label, verdict.reason, series=details)
        else:
            for f in files:
                if not f.is_image:
                    problem(f.path, f.reason)
            whole = alone and not verdict.dropped_files and all(f.is_image for f in files)
            item = {"image": str(folders[0]) if whole else [str(f.path) for f in verdict.stack]}
            if not whole:
                item["input"] = label
            item["series"] = details
            parts = (folders[0].relative_to(root).parts or (root.resolve().name,)) if alone else (_series_name(first),)
            found.append((item, parts))

    names = _unique_names([parts for _, parts in found])
    inputs = [{**item, "name": name} for (item, _), name in zip(found, names)]
    return (sorted(inputs, key=lambda i: str(i.get("input", i["image"]))),
            list(problems.values()) + notes)


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix() or "."
    except ValueError:
        return str(path)


def _series_label(first) -> str:
    """How a series that is not alone in its folder is named in the summary: patient / study / series / UID."""
    study = first.tag("StudyDescription") or first.tag("StudyDate") or "no study description"
    return (f"{first.tag('PatientID') or 'no patient ID'} / {study} / series {first.tag('SeriesNumber') or '?'} "
            f"{first.tag('SeriesDescription')!r} ({first.tag('SeriesInstanceUID') or 'no series UID'})")


def _series_name(first) -> str:
    """A readable mask name for a series that is not alone in its folder (made filesystem-safe by _unique_names)."""
    uid = re.sub(r"\D", "", first.tag("SeriesInstanceUID"))[-6:]
    parts = [first.tag("PatientID"), first.tag("StudyDescription") or first.tag("StudyDate"),
             f"S{first.tag('SeriesNumber')}" if first.tag("SeriesNumber") else "",
             first.tag("SeriesDescription")[:40], uid]
    return "_".join(p for p in parts if p) or "series"


LABEL_SUFFIXES = ("_segmentation.nii.gz", "_segmentation.nii")  # a label's name: its input's name + one of these


def attach_labels(inputs: Sequence[Dict[str, str]], labelled_dir: PathLike) -> List[Dict[str, str]]:
    """Give some of a folder's inputs (from :func:`find_inputs`) their label maps: ``inputs`` with a ``label`` key
    on each input whose ``<name>_segmentation.nii.gz`` (or ``.nii``) is in ``labelled_dir``; the others unchanged.

    Every file is checked before anything runs, so a mistake costs no work: each label's header must read, be
    3-D (or 3-D with a trailing axis of 1) and, for a NIfTI input, have its input's shape.

    Raises:
        FileNotFoundError: ``labelled_dir`` does not exist or is not a folder.
        ValueError: the folder holds no label, a label matches no input (a typo would otherwise silently
            leave out evidence; the message lists the input names), or a label is unreadable or of another
            shape than its input.

    Example::

        >>> inputs, _ = find_inputs("site")               # Case00 .. Case09
        >>> items = attach_labels(inputs, "site_labels")  # site_labels/Case00_segmentation.nii.gz, ...
        >>> items[0]["label"]   # 'site_labels/Case00_segmentation.nii.gz'; an input without a label has none
    """
    import nibabel as nib

    folder = Path(labelled_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"labelled_dir not found: {folder}" if not folder.exists()
                                else f"labelled_dir is not a folder: {folder}")
    labels: Dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        suffix = next((s for s in LABEL_SUFFIXES if path.name.endswith(s)), None)
        if suffix and not path.name.startswith("."):
            labels[path.name[: -len(suffix)]] = path
    if not labels:
        raise ValueError(f"labelled_dir {folder} holds no label map (expected <input name>{LABEL_SUFFIXES[0]})")
    by_name = {item["name"]: item for item in inputs}
    unknown = sorted(set(labels) - set(by_name))
    if unknown:
        raise ValueError(f"labels in {folder} match no input: {', '.join(labels[n].name for n in unknown)} "
                         f"(inputs: {', '.join(sorted(by_name)) or 'none'})")
    for name, path in labels.items():
        try:
            shape = tuple(nib.load(str(path)).shape)
        except Exception as e:  # nibabel raises several types for a damaged or foreign file
            raise ValueError(f"label {path} cannot be read: {e}") from None
        shape = shape[:3] if len(shape) == 4 and shape[3] == 1 else shape
        if len(shape) != 3:
            raise ValueError(f"label {path} has shape {shape}; a label map is 3-D")
        image = by_name[name]["image"]
        if isinstance(image, (str, Path)) and _NIFTI_RE.search(Path(image).name):  # a DICOM series: checked when loaded
            try:
                image_shape = tuple(nib.load(str(image)).shape)[:3]
            except Exception:  # a damaged input is named and skipped when it is loaded, as without labels
                continue
            if image_shape != shape:
                raise ValueError(f"label {path} has shape {shape}, its input {image} {image_shape}")
    return [{**item, "label": str(labels[item["name"]])} if item["name"] in labels else dict(item) for item in inputs]


def _unique_names(parts: List[Tuple[str, ...]]) -> List[str]:
    """``_``-joined, filesystem-safe names; a clash (``a/b`` and ``a_b``, ``x.nii`` and ``x.nii.gz``) gets ``_2`` ..."""
    base = [re.sub(r"[^A-Za-z0-9._-]+", "_", "_".join(p)).strip("._-") or "input" for p in parts]
    taken, used, out = set(base), set(), []
    for name in base:
        unique, k = name, 1
        while unique in used or (unique != name and unique in taken):  # never take another input's own name
            k += 1
            unique = f"{name}_{k}"
        used.add(unique)
        out.append(unique)
    return out
