"""Per-site datalists: split by case, write, read back with checks that name the bad file.

A site folder holds ``CaseNN.nii.gz`` volumes with ``CaseNN_segmentation.nii.gz`` (or
``_Segmentation``) masks beside them, and one MONAI decathlon-style ``datalist.json``
with ``training`` / ``validation`` / ``testing`` lists of ``{"image", "label"}`` paths
relative to the site folder. Splits are by case (patient), never by slice. Cases (or masks)
stored as DICOM series folders ``CaseNN/`` (``CaseNN_segmentation/``) are converted once to
``CaseNN.nii.gz`` beside them by :func:`convert_dicom_cases`, so datalists only ever list NIfTI.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from fedharmony.core.files import DATALIST_NAME  # defined beside the site map: the image readers skip both

logger = logging.getLogger(__name__)

SPLITS = ("training", "validation", "testing")
_CASE_RE = re.compile(r"^(Case\d+)\.nii(\.gz)?$", re.IGNORECASE)
_LABEL_SET_RE = re.compile(r"^(Case\d+)_[A-Za-z0-9]+_segmentation\.nii(\.gz)?$", re.IGNORECASE)
_MASK_SUFFIXES = ("_segmentation", "_Segmentation")
_CASE_DIR_RE = re.compile(r"^Case\d+(_segmentation)?$", re.IGNORECASE)


class SiteDataError(ValueError):
    """A site's data is missing, corrupt or inconsistent; the message names the site and file."""


def split_cases(case_ids: Sequence[str], seed: int, fractions=(0.6, 0.2, 0.2)) -> Dict[str, List[str]]:
    """Shuffle case ids with ``seed`` and split them into training / validation / testing.

    Every split gets at least one case when there are at least three cases; the
    remainder after validation and testing goes to training.
    """
    ids = sorted(set(case_ids))
    if len(ids) != len(case_ids):
        raise ValueError("duplicate case ids in split_cases")
    if len(ids) < 3:
        raise ValueError(f"need at least 3 cases to split into {SPLITS}, got {len(ids)}")
    order = np.random.default_rng(seed).permutation(len(ids))
    shuffled = [ids[i] for i in order]
    n_val = max(1, int(round(len(ids) * fractions[1])))
    n_test = max(1, int(round(len(ids) * fractions[2])))
    n_train = len(ids) - n_val - n_test
    if n_train < 1:
        raise ValueError(f"{len(ids)} cases leave none for training")
    return {
        "training": sorted(shuffled[:n_train]),
        "validation": sorted(shuffled[n_train:n_train + n_val]),
        "testing": sorted(shuffled[n_train + n_val:]),
    }


def find_cases(site_dir: str | Path) -> Tuple[Dict[str, Tuple[str, str]], List[str]]:
    """Scan a site folder in the multi-site prostate layout.

    Returns:
        cases: {case id: (image file name, mask file name)} for complete pairs.
        skipped: human-readable reasons for every file that was not used.
    """
    site_dir = Path(site_dir)
    if not site_dir.is_dir():
        raise SiteDataError(f"site folder not found: {site_dir}")
    names = sorted(p.name for p in site_dir.iterdir() if p.is_file())
    cases, skipped = {}, []
    masks = set()
    for name in names:
        m = _CASE_RE.match(name)
        if not m:
            continue
        case, ext = m.group(1), name[len(m.group(1)):]
        mask = next((case + s + ext for s in _MASK_SUFFIXES if (case + s + ext) in names), None)
        if mask is None:
            skipped.append(f"{site_dir.name}/{name}: no mask ({case}_segmentation{ext})")
            continue
        cases[case] = (name, mask)
        masks.add(mask)
    for name in names:
        if name in masks or _CASE_RE.match(name) or name == DATALIST_NAME:
            continue
        other = _LABEL_SET_RE.match(name)  # another label set of a listed case, and its datalist: not skipped
        if other and other.group(1) in cases or re.match(r"^datalist_[A-Za-z0-9]+\.json$", name):
            continue
        if any(s in name for s in _MASK_SUFFIXES):
            skipped.append(f"{site_dir.name}/{name}: mask without its image")
        else:
            skipped.append(f"{site_dir.name}/{name}: not a CaseNN volume")
    return cases, skipped


def convert_dicom_cases(site_dir: str | Path, overwrite: bool = False, series_filter="MR"
                        ) -> Tuple[List[str], List[str]]:
    """Convert each DICOM case folder ``CaseNN/`` or ``CaseNN_segmentation/`` of a site to NIfTI beside it.

    ``<site>/Case00/`` becomes ``<site>/Case00.nii.gz`` (``Case00_segmentation/`` becomes
    ``Case00_segmentation.nii.gz``) with the series' voxels and geometry, written atomically, so
    :func:`find_cases` then pairs them like any NIfTI case. An existing NIfTI is kept unless
    ``overwrite``. A case folder may hold a whole study as exported: its DICOM files are grouped by
    series exactly as inference groups them (:func:`fedharmony.data.images.find_inputs`): series the
    ``series_filter`` does not take and localizers are left out (and named), localizer images are
    dropped from a series, and the folder is converted when exactly one series is left. A mask folder
    takes no filter (a mask series' modality is whatever its writer chose). A bad series is named and
    skipped, the rest go on.

    Args:
        site_dir: the site folder.
        overwrite: convert again over existing NIfTI files.
        series_filter: which series of an image folder to take (``"MR"``, or e.g.
            ``{"Modality": "MR", "SeriesDescription": "*T2*"}``: see :class:`fedharmony.data.dicom.SeriesFilter`).

    Returns:
        converted: one line per NIfTI written, e.g. ``"BIDMC/Case00/ -> Case00.nii.gz"``.
        skipped: human-readable reasons for every folder (or file or series in it) not converted.

    Raises:
        SiteDataError: the site folder does not exist.
        ValueError: ``series_filter`` names something that is not a DICOM keyword.
    """
    from fedharmony.data.dicom import SeriesFilter
    from fedharmony.data.images import convert_to_nifti, find_inputs  # local: SimpleITK and MONAI are heavy

    site_dir = Path(site_dir)
    if not site_dir.is_dir():
        raise SiteDataError(f"site folder not found: {site_dir}")
    selection = SeriesFilter(series_filter)  # refused before any folder is read

    def where_is(name: str) -> str:  # a path under the site, or a series named by patient / study / series
        try:
            return f"{site_dir.name}/{Path(name).relative_to(site_dir).as_posix()}"
        except ValueError:
            return name

    converted, skipped = [], []
    for folder in sorted(p for p in site_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        where = f"{site_dir.name}/{folder.name}/"
        out = site_dir / (folder.name + ".nii.gz")
        if not _CASE_DIR_RE.match(folder.name):
            skipped.append(f"{where}: not a CaseNN or CaseNN_segmentation DICOM series folder")
            continue
        if out.exists() and not overwrite:
            skipped.append(f"{where}: not converted, {out.name} exists and is used (--overwrite converts again)")
            continue
        is_mask = folder.name.lower().endswith("_segmentation")
        inputs, problems = find_inputs(folder, series_filter=None if is_mask else selection)
        errors = [p for p in problems if p.get("status") not in ("not selected", "note")]
        skipped.extend(f"{where_is(p['input'])}: {p['reason']}" for p in problems if p.get("status") != "note")
        series = [i for i in inputs if "series" in i]
        if not inputs and errors:
            continue  # the reasons are above
        if len(inputs) != 1 or len(series) != 1:
            found = ", ".join(where_is(i.get("input", i["image"])) for i in inputs) or "nothing usable"
            hint = (f"; set --series_filter to pick one (now: {selection})" if len(series) > 1 else "")
            skipped.append(f"{where}: expected one DICOM series, found {found}; not converted{hint}")
            continue
        try:
            convert_to_nifti(series[0]["image"], out, overwrite=overwrite)
        except Exception as e:  # SimpleITK raises RuntimeError for unreadable pixel data
            skipped.append(f"{where}: cannot convert to {out.name}: {type(e).__name__}: {e}")
            continue
        info = series[0]["series"]
        extra = (f" (series {info['series_number']} {info['series_description']!r}"
                 f"{'; dropped ' + info['dropped'] if info['dropped'] else ''})"
                 if "input" in series[0] else "")
        converted.append(f"{where} -> {out.name}{extra}")
    return converted, skipped


def make_datalist(cases: Dict[str, Tuple[str, str]], seed: int, fractions=(0.6, 0.2, 0.2)) -> dict:
    """Decathlon-style datalist (relative paths) from :func:`find_cases` output."""
    split = split_cases(list(cases), seed, fractions)
    return {
        name: [{"image": cases[c][0], "label": cases[c][1], "case": c} for c in ids]
        for name, ids in split.items()
    }


def write_datalist(site_dir: str | Path, datalist: dict, site: str = "", name: str = DATALIST_NAME) -> Path:
    path = Path(datalist_path(site_dir, name))
    payload = {"name": site or Path(site_dir).name, **datalist}
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def check_case(image_path: str | Path, label_path: Optional[str | Path], site: str = "") -> Tuple[int, ...]:
    """Open an image (and its mask) fully; raise :class:`SiteDataError` naming the file on any problem.

    Returns the image's spatial shape. Reads the voxel data, not just the header, so a
    truncated or corrupt gzip stream is caught here and not in the middle of training.
    """
    import nibabel as nib  # local: keep `import fedharmony` light

    where = f"site {site!r}: " if site else ""
    shapes = []
    for path in [image_path] + ([label_path] if label_path else []):
        path = Path(path)
        if not path.is_file():
            raise SiteDataError(f"{where}file not found: {path}")
        try:
            vol = nib.load(str(path))
            data = np.asanyarray(vol.dataobj)
        except Exception as e:  # nibabel raises many types for broken files
            raise SiteDataError(f"{where}cannot read NIfTI {path}: {type(e).__name__}: {e}") from None
        if data.ndim != 3:
            raise SiteDataError(f"{where}{path} has shape {data.shape}; expected a 3-D volume (H, W, D)")
        if not np.isfinite(data).all():
            raise SiteDataError(f"{where}{path} contains NaN or Inf voxels")
        shapes.append(data.shape)
    if len(shapes) == 2 and shapes[0] != shapes[1]:
        raise SiteDataError(f"{where}image {image_path} has shape {shapes[0]} but mask {label_path} "
                            f"has shape {shapes[1]}")
    return shapes[0]


def read_split(datalist: str | Path, split: str, site: str = "") -> Tuple[List, dict]:
    """The non-empty ``split`` list of a datalist file, and the whole file's content.

    Raises:
        SiteDataError: the file is missing or not a JSON object, or the split is missing or empty.
    """
    datalist = Path(datalist)
    where = f"site {site!r}: " if site else ""
    if not datalist.is_file():
        missing = "" if datalist.parent.is_dir() else f" (the folder {datalist.parent} does not exist)"
        raise SiteDataError(f"{where}datalist not found: {datalist}{missing}")
    try:
        content = json.loads(datalist.read_text())
    except json.JSONDecodeError as e:
        raise SiteDataError(f"{where}datalist {datalist} is not valid JSON: {e}") from None
    if not isinstance(content, dict) or split not in content:
        raise SiteDataError(f"{where}datalist {datalist} has no {split!r} list "
                            f"(has {sorted(content) if isinstance(content, dict) else type(content).__name__})")
    items = content[split]
    if not isinstance(items, list) or not items:
        raise SiteDataError(f"{where}datalist {datalist}: the {split!r} list is empty; the site has no data for it")
    return items, content


def smallest_split(data_root: str | Path, split: str = "training", num_sites: Optional[int] = None) -> Tuple[int, str]:
    """``(size, site folder)``: the fewest items any site of a federation's data folder has in ``split``.

    The sites are those of ``<data_root>/sites.json`` (simulator name -> folder, each folder with
    its ``datalist.json``); with ``num_sites``, only ``site-1`` .. ``site-<num_sites>`` (the simulator's).
    """
    from fedharmony.core.files import read_site_map

    root = Path(data_root)
    site_map = read_site_map(str(root))
    if num_sites is not None:
        site_map = {k: v for k, v in site_map.items() if k in {f"site-{i}" for i in range(1, num_sites + 1)}}
    if not site_map:
        raise SiteDataError(f"{root}: no site listed in sites.json (simulator name -> site folder)")
    sizes = {Path(folder).name: len(read_split(root / folder / DATALIST_NAME, split, Path(folder).name)[0])
             for folder in site_map.values()}
    site = min(sizes, key=sizes.get)
    return sizes[site], site


def datalist_path(dataset_dir: str | Path, name: str = "datalist.json") -> str:
    """The datalist ``name`` in ``dataset_dir``: a plain ``.json`` file name, never a path, so that a job's
    setting cannot point a site at a list outside its data folder.

    Raises:
        ValueError: ``name`` holds a folder separator, is ``..``-like or does not end in ``.json``.
    """
    # name != Path(name).name catches "/" (and "a/.."); a backslash is a separator only on Windows
    if (not isinstance(name, str) or not name.endswith(".json") or name != Path(name).name or name.startswith(".")
            or "\\" in name):
        raise ValueError(f"datalist_file must be a .json file name in the site's data folder, got {name!r}")
    return str(Path(dataset_dir) / name)


def load_datalist(datalist: str | Path, split: str, base_dir: Optional[str | Path] = None,
                  site: str = "", check: bool = True, require_labels: bool = True, max_cases: int = 0) -> List[dict]:
    """Read one split of a site datalist into MONAI data dicts with absolute paths.

    Args:
        datalist: path of the site's ``datalist.json``.
        split: ``training``, ``validation`` or ``testing``.
        base_dir: folder the relative paths are relative to (default: the datalist's folder).
        site: site name, only for error messages.
        check: open every listed file (see :func:`check_case`).
        require_labels: every item needs a ``label``.
        max_cases: > 0: only the split's first ``max_cases`` items (a federation that cuts every
            site to the smallest site's size); 0: all.

    Raises:
        SiteDataError: datalist missing/unreadable, split missing or empty, a listed
            file missing or corrupt, image/mask shapes differing. The message names
            the site and the file.
    """
    datalist = Path(datalist)
    where = f"site {site!r}: " if site else ""
    if isinstance(max_cases, bool) or not isinstance(max_cases, int) or max_cases < 0:
        raise ValueError(f"{where}max_cases must be an integer >= 0 (0 = all), got {max_cases!r}")
    items = read_split(datalist, split, site)[0]
    if max_cases and len(items) > max_cases:
        logger.info("%s%s: using the first %d of %d cases (max_cases)", where, split, max_cases, len(items))
        items = items[:max_cases]
    base = Path(base_dir) if base_dir else datalist.parent
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or "image" not in item or (require_labels and "label" not in item):
            raise SiteDataError(f"{where}datalist {datalist}: {split}[{i}] needs 'image'"
                                f"{' and label' if require_labels else ''}: {item!r}")
        entry = dict(item)
        for key in ("image", "label"):
            if key in entry:
                entry[key] = str((base / entry[key]).resolve())
        if check:
            check_case(entry["image"], entry.get("label"), site)
        out.append(entry)
    return out
