"""Scans as hospitals store them: a SimpleITK reader for MONAI, DICOM series, and a folder scan.

* :class:`SimpleITKReader` reads NIfTI, MetaImage, NRRD, single DICOM files and folders holding
  one DICOM series, and returns them exactly as MONAI's ``NibabelReader`` returns a NIfTI file
  (array ``(x, y, z)``, RAS ``affine``), so the same transforms, ``Invertd`` and ``SaveImaged``
  work on either.
* :func:`find_inputs` scans a folder handed over by a hospital: every NIfTI volume and every DICOM
  series folder is an input; everything else is named with the reason it cannot be used.
* :func:`convert_to_nifti` writes one image (e.g. a DICOM series) as NIfTI, atomically.

No NVFlare import. Example::

    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged
    from fedharmony.data.images import SimpleITKReader, find_inputs

    inputs, problems = find_inputs("/data/hospital_export", exclude=["/data/hospital_export/predictions"])
    for p in problems:
        print(f"skipped {p['input']}: {p['reason']}")
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
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import SimpleITK as sitk
from monai.data import ImageReader
from monai.data.image_reader import _copy_compatible_dict, _stack_images  # the stacking ITKReader uses
from monai.data.utils import orientation_ras_lps
from monai.utils import ImageMetaKey, MetaKeys, SpaceKeys

from fedharmony.core.files import SITE_MAP_NAME
from fedharmony.data.datalist import DATALIST_NAME

__all__ = ["SimpleITKReader", "find_inputs", "attach_labels", "convert_to_nifti"]

PathLike = Union[str, Path]

# file endings SimpleITKReader claims in LoadImage's automatic reader choice; scanners often write
# DICOM files without any ending, and a folder is read as a DICOM series
_SUFFIXES = (".nii", ".nii.gz", ".mha", ".mhd", ".nrrd", ".nhdr", ".dcm", ".dicom", ".ima")
_NIFTI_RE = re.compile(r"\.nii(\.gz)?$", re.IGNORECASE)
_MASK_RE = re.compile(r"_(segmentation|seg)(\.nii(\.gz)?)?$", re.IGNORECASE)  # masks are not inputs
_IGNORED_NAMES = {DATALIST_NAME, SITE_MAP_NAME}
_SERIES_UID, _SERIES_DESCRIPTION = "0020|000e", "0008|103e"

# SOP classes of DICOM files that carry no image, to say what such a file is
_NON_IMAGE_SOP = {
    "1.2.840.10008.1.3.10": "a DICOMDIR (an index of the files on a CD)",
    "1.2.840.10008.5.1.4.1.1.88.": "a structured report",
    "1.2.840.10008.5.1.4.1.1.11.": "a presentation state",
    "1.2.840.10008.5.1.4.1.1.104.": "an encapsulated document (PDF)",
    "1.2.840.10008.5.1.4.1.1.481.": "a radiotherapy object",
    "1.2.840.10008.5.1.4.1.1.66": "a segmentation / registration object",
}


def _read_sitk(path: PathLike, series_name: str = "", **kwargs) -> sitk.Image:
    """One ``sitk.Image`` from a file or a folder holding one DICOM series (``kwargs``: for ``sitk.ReadImage``)."""
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
                         "or give each series its own folder")
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(path, series_name or ids[0])
    return sitk.ReadImage(list(files), **kwargs)


class SimpleITKReader(ImageReader):
    """Load images with SimpleITK, in MONAI's ``NibabelReader`` / ``ITKReader`` conventions.

    Reads anything ``sitk.ReadImage`` reads (``.nii``, ``.nii.gz``, ``.mha``, ``.nrrd``, a single
    DICOM file) and a folder holding one DICOM series. The array is SimpleITK's reversed, i.e.
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
        """True for folders (DICOM series), the endings SimpleITK reads, and files without an ending (DICOM)."""
        names = [filename] if isinstance(filename, (str, Path)) else list(filename)
        return all(Path(n).is_dir() or str(n).lower().endswith(_SUFFIXES) or not Path(n).suffix for n in names)

    def read(self, data: Union[Sequence[PathLike], PathLike], **kwargs):
        """``sitk.Image`` (or a list of them for several paths, stacked as channels by :meth:`get_data`).

        Args:
            data: a file, a DICOM series folder, or a list of them.
            kwargs: for ``sitk.ReadImage``; override the constructor's.
        """
        names = [data] if isinstance(data, (str, Path)) else list(data)
        self.filenames = tuple(str(n) for n in names)  # for filename_or_obj, as NibabelReader keeps them
        kwargs_ = {**self.kwargs, **kwargs}
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


def convert_to_nifti(source: PathLike, out_path: PathLike, *, overwrite: bool = False) -> Path:
    """Write ``source`` (a DICOM series folder or any file SimpleITK reads) as NIfTI at ``out_path``.

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


def find_inputs(folder: PathLike, *, recursive: bool = True, exclude: Union[PathLike, Iterable[PathLike], None] = None
                ) -> Tuple[List[Dict[str, str]], List[Dict[str, str]]]:
    """Scan a folder as a hospital hands it over: what can be segmented, and why the rest cannot.

    Inputs are NIfTI files (``.nii``, ``.nii.gz``; masks named ``*_segmentation.nii*`` or
    ``*_seg.nii*`` are not inputs) and folders
    holding exactly one usable DICOM series (a sub-folder named like a mask, e.g.
    ``Case00_segmentation/``, is not an input either). Only names and file headers are read:
    a corrupt NIfTI is found when it is loaded.

    Args:
        folder: the folder to scan.
        recursive: also scan sub-folders (otherwise each sub-folder is reported as not searched).
        exclude: folders (e.g. the output folder) or files to leave out, with everything under them.

    Returns:
        inputs: sorted by path, ``[{"image": str(path), "name": stem}]``; ``name`` is unique and
            filesystem-safe: a file's stem without ``.nii``/``.nii.gz``, a series folder's path
            relative to ``folder`` joined with ``_`` (a folder in a sub-folder: ``sub_file``).
        problems: ``[{"input": str(path), "reason": text}]`` for everything else found: folders
            with several DICOM series or with a missing slice, DICOM files without an image
            (structured reports, DICOMDIR), other formats, files that are no image. Hidden files,
            ``datalist.json`` and ``sites.json`` are ignored silently.

    Raises:
        FileNotFoundError: ``folder`` does not exist or is not a folder.

    Example::

        >>> inputs, problems = find_inputs("export")
        >>> inputs    # [{'image': 'export/Case00.nii.gz', 'name': 'Case00'},
        ...           #  {'image': 'export/MR/T2', 'name': 'MR_T2'}]
        >>> problems   # [{'input': 'export/MR/DWI', 'reason': 'holds 2 DICOM series (...); skipped ...'}]
    """
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"input folder not found: {root}" if not root.exists()
                                else f"input is not a folder: {root}")
    if exclude is None:
        exclude = []
    excluded = {Path(p).resolve() for p in ([exclude] if isinstance(exclude, (str, Path)) else exclude)}
    found: List[Tuple[Path, Tuple[str, ...]]] = []  # (input path, name parts)
    problems: List[Dict[str, str]] = []

    def problem(path, reason):
        problems.append({"input": str(path), "reason": reason})

    def unlistable(e: OSError):
        problem(e.filename, f"cannot list the folder: {e.strerror}")

    for here, dirs, files in os.walk(root, onerror=unlistable):
        here = Path(here)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and (here / d).resolve() not in excluded)
        if not recursive:
            for d in dirs:
                problem(here / d, "a sub-folder; not searched (recursive=False)")
            dirs[:] = []
        rel = here.relative_to(root).parts
        slices = []
        for name in sorted(files):
            path = here / name
            if name.startswith(".") or name in _IGNORED_NAMES or path.resolve() in excluded:
                continue
            if _NIFTI_RE.search(name):
                if not _MASK_RE.search(name):
                    found.append((path, rel + (_NIFTI_RE.sub("", name),)))
                continue
            header = _header(path)
            if isinstance(header, str):
                problem(path, header)
            else:
                slices.append((path, header))
        if slices and not (rel and _MASK_RE.search(here.name)):  # the folder asked for is never a mask
            reason = _series_problem(slices)
            if reason:
                problem(here, reason)
            else:
                found.append((here, rel or (root.resolve().name,)))
    inputs = [{"image": str(p), "name": n} for (p, _), n in zip(found, _unique_names([parts for _, parts in found]))]
    return sorted(inputs, key=lambda i: i["image"]), problems


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
        image = Path(by_name[name]["image"])
        if _NIFTI_RE.search(image.name):
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


def _header(path: Path) -> Union[sitk.ImageFileReader, str]:
    """SimpleITK's header read of a DICOM file, or why ``path`` is not a DICOM image."""
    try:
        with open(path, "rb") as f:
            is_dicom = f.read(132)[128:] == b"DICM"  # the DICOM file preamble
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
        sop = _sop_class(path)
        what = next((v for k, v in _NON_IMAGE_SOP.items() if sop.startswith(k)), "")
        return (f"a DICOM file without an image (no pixel data SimpleITK can read"
                f"{f'; SOP class {sop}' if sop else ''}{f': {what}' if what else ''}); not an input")
    return reader


def _sop_class(path: Path) -> str:
    """Media Storage SOP Class UID (0002,0002) from a DICOM file's meta header ('' if not found).

    The meta header (group 0002) is always explicit-VR little endian right after the preamble,
    so a few lines read it without a DICOM library.
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


def _series_problem(slices: List[Tuple[Path, sitk.ImageFileReader]]) -> Optional[str]:
    """Why the DICOM images of one folder are not one usable series (None if they are)."""
    def tag(reader, key):
        return reader.GetMetaData(key).strip() if reader.HasMetaDataKey(key) else ""

    series: Dict[str, list] = {}
    for path, reader in slices:
        series.setdefault(tag(reader, _SERIES_UID), []).append((path, reader))
    if len(series) > 1:
        listed = "; ".join(f"{uid or 'no series UID'}: {len(s)} file(s)"
                           f"{', ' + tag(s[0][1], _SERIES_DESCRIPTION) if tag(s[0][1], _SERIES_DESCRIPTION) else ''}"
                           for uid, s in sorted(series.items()))
        return (f"holds {len(series)} DICOM series ({listed}); skipped: the files are not split up "
                "automatically, give each series its own folder")
    if len(slices) == 1:
        return None
    sizes = sorted({r.GetSize() for _, r in slices})
    if len(sizes) > 1:
        return f"the DICOM files of one series differ in size {sizes}; skipped"
    if sizes[0][2] > 1:
        return f"{len(slices)} multi-frame DICOM files in one series; skipped (one multi-frame file is a series)"
    directions = np.array([r.GetDirection() for _, r in slices])
    if not np.allclose(directions, directions[0], atol=1e-4):
        return "the slices of one series have different orientations (e.g. a localizer mixed in); skipped"
    normal = directions[0].reshape(3, 3)[:, 2]
    positions = np.array([np.dot(r.GetOrigin(), normal) for _, r in slices])
    order = np.argsort(positions)
    positions, names = positions[order], [slices[i][0].name for i in order]
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
