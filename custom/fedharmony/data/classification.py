"""Classification sites: prepare the real datasets' layouts into per-site datalists, and read them back.

Two public multi-site classification datasets, each kept in its released layout:

* Histology, Camelyon17-WILDS (``camelyon17_v1.0``): ``<root>/metadata.csv`` with header
  ``,patient,node,x_coord,y_coord,tumor,slide,center,split`` and 96 x 96 RGB patches at
  ``<root>/patches/patient_{patient:03d}_node_{node}/patch_patient_{patient:03d}_node_{node}_x_{x}_y_{y}.png``.
  (``patient`` is written zero-padded, e.g. ``004``; the patches are opaque RGBA PNGs.)
  One site per hospital (``center`` 0..4), folder ``hospital_<center>``; 2 classes
  (``normal`` = 0, ``tumor`` = 1); split by patient with :func:`fedharmony.data.datalist.split_cases`.
* Dermoscopy, the PRR-FL "FedSkinLesion" layout: ``<data_dir>/client{A,B,C,D}/img_resize128/<image_id>.png``
  and ``<csv_folder>/client{X}/{train,valid,test}_client{X}.csv`` (header
  ``image_id,label,label_binary,lesion_id,dx,dx_type,age,sex,localization,dataset``).
  One site per client; 3 classes (``nv`` = 0, ``bkl`` = 1, ``mel`` = 2); the released split
  (one CSV per split) is kept and checked to be disjoint by lesion.

Each site folder gets a MONAI decathlon-style ``datalist.json``::

    {"name": site, "classes": [...], "training": [{"image": <path relative to the site folder>,
     "label": <int>, "case": <patient / lesion id>}, ...], "validation": [...], "testing": [...]}

and the output root a ``sites.json`` mapping simulator client names ``site-1`` ... to site folders.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from fedharmony.data.datalist import DATALIST_NAME, SPLITS, SiteDataError, read_split, split_cases, write_datalist

from fedharmony.core.files import write_site_map

HISTOLOGY_CLASSES = ("normal", "tumor")
CAMELYON_DIR = "camelyon17_v1.0"
CAMELYON_METADATA = "metadata.csv"
CAMELYON_COLUMNS = ("", "patient", "node", "x_coord", "y_coord", "tumor", "slide", "center", "split")

DERMOSCOPY_CLASSES = ("nv", "bkl", "mel")
DERMOSCOPY_IMAGE_FOLDER = "img_resize128"
DERMOSCOPY_CSV_COLUMNS = ("image_id", "label", "label_binary", "lesion_id", "dx", "dx_type", "age", "sex",
                          "localization", "dataset")
# CSV file stem -> datalist split
DERMOSCOPY_SPLIT_FILES = {"train": "training", "valid": "validation", "test": "testing"}


def camelyon17_patch_path(patient: int, node: int, x: int, y: int) -> str:
    """A patch's path relative to the WILDS root."""
    folder = f"patient_{patient:03d}_node_{node}"
    return f"patches/{folder}/patch_{folder}_x_{x}_y_{y}.png"


def hospital_site(center: int) -> str:
    return f"hospital_{center}"


def dermoscopy_csv_path(csv_folder: str | Path, client: str, stem: str) -> Path:
    """``<csv_folder>/<client>/<stem>_<client>.csv`` (stem: train / valid / test)."""
    return Path(csv_folder) / client / f"{stem}_{client}.csv"


def _write_sites(out_dir: Path, pending: Sequence[tuple]) -> List[Path]:
    """Write every ``(site folder, datalist)`` and ``sites.json`` (simulator ``site-N`` -> folder)."""
    for site_dir, datalist in pending:
        site_dir.mkdir(parents=True, exist_ok=True)
        write_datalist(site_dir, datalist, site_dir.name)
    write_site_map(out_dir, [d.name for d, _ in pending])
    return [d for d, _ in pending]


# ----------------------------------------------------------------------------------------- histology

def read_camelyon17_metadata(wilds_root: str | Path) -> List[dict]:
    """Rows of ``<wilds_root>/metadata.csv`` as dicts of ints (``patient``, ``node``, ``x_coord``,
    ``y_coord``, ``tumor``, ``center``, and ``slide`` / ``split`` when present).

    Raises:
        SiteDataError: file missing, a required column missing, a value not an integer or
            ``tumor`` not 0/1; the message names the file (and line).
    """
    path = Path(wilds_root) / CAMELYON_METADATA
    if not path.is_file():
        raise SiteDataError(f"Camelyon17-WILDS metadata not found: {path}")
    required = ("patient", "node", "x_coord", "y_coord", "tumor", "center")
    rows = []
    with path.open(newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None:
            raise SiteDataError(f"{path} is empty; expected the header {','.join(CAMELYON_COLUMNS)}")
        missing = [c for c in required if c not in header]
        if missing:
            raise SiteDataError(f"{path}: column(s) {missing} missing; header is {header!r}, expected "
                                f"{','.join(CAMELYON_COLUMNS)}")
        cols = {c: header.index(c) for c in required + ("slide", "split") if c in header}
        for line, rec in enumerate(reader, start=2):
            if not rec:
                continue
            try:
                row = {c: int(float(rec[i])) for c, i in cols.items()}
            except (ValueError, IndexError):
                raise SiteDataError(f"{path} line {line}: expected integers in columns {list(cols)}, "
                                    f"got {rec!r}") from None
            if row["tumor"] not in (0, 1):
                raise SiteDataError(f"{path} line {line}: tumor must be 0 or 1, got {row['tumor']}")
            rows.append(row)
    if not rows:
        raise SiteDataError(f"{path} lists no patches")
    return rows


def _patient_case(row: dict) -> str:
    return f"patient_{row['patient']:03d}"


def prepare_camelyon17(wilds_root: str | Path, out_dir: str | Path, seed: int = 0,
                       patches_per_hospital: Optional[int] = None, fractions=(0.6, 0.2, 0.2),
                       check_files: bool = True) -> List[Path]:
    """Per-hospital site folders ``out_dir/hospital_<center>/datalist.json`` from a Camelyon17-WILDS root.

    Args:
        wilds_root: the ``camelyon17_v1.0`` folder (``metadata.csv`` + ``patches/``).
        out_dir: where the site folders and ``sites.json`` go; image paths in the datalists
            are relative to each site folder (for example ``../camelyon17_v1.0/patches/...``).
        seed: seed of the patient split and of the subsampling.
        patches_per_hospital: keep a seeded random subset of this many patches per hospital
            (default: all).
        fractions: training / validation / testing fractions of each hospital's patients.
        check_files: every kept patch must exist (decoding is left to the loader).

    Returns:
        The site folders, in center order. The WILDS ``split`` column is not used: the split
        is by patient within each hospital (a patient's nodes stay together).

    Raises:
        SiteDataError: bad metadata, a hospital with fewer than 3 patients, missing patches.
    """
    root = Path(wilds_root)
    out = Path(out_dir)
    rows = read_camelyon17_metadata(root)
    if patches_per_hospital is not None and patches_per_hospital < 3:
        raise ValueError(f"patches_per_hospital must be at least 3, got {patches_per_hospital}")
    by_center: Dict[int, List[dict]] = {}
    for row in rows:
        by_center.setdefault(row["center"], []).append(row)
    pending = []  # check every hospital before writing any datalist
    for center in sorted(by_center):
        site = hospital_site(center)
        chosen = by_center[center]
        if patches_per_hospital is not None and len(chosen) > patches_per_hospital:
            keep = np.random.default_rng([seed, 17, center]).choice(len(chosen), patches_per_hospital, replace=False)
            chosen = [chosen[i] for i in sorted(keep)]
        patients = sorted({_patient_case(r) for r in chosen})
        if len(patients) < 3:
            raise SiteDataError(f"site {site!r}: {root / CAMELYON_METADATA} has {len(patients)} patient(s) "
                                f"for center {center} ({patients}); a site needs 3 to split by patient")
        split = split_cases(patients, seed, fractions)
        split_of = {c: s for s, ids in split.items() for c in ids}
        site_dir = out / site
        rel_root = os.path.relpath(root.resolve(), site_dir.resolve())
        datalist = {"classes": list(HISTOLOGY_CLASSES), **{s: [] for s in SPLITS}}
        missing = []
        for r in chosen:
            rel = camelyon17_patch_path(r["patient"], r["node"], r["x_coord"], r["y_coord"])
            if check_files and not (root / rel).is_file():
                missing.append(str(root / rel))
            case = _patient_case(r)
            datalist[split_of[case]].append({"image": f"{rel_root}/{rel}", "label": r["tumor"], "case": case})
        if missing:
            raise SiteDataError(f"site {site!r}: {len(missing)} patch file(s) listed in "
                                f"{root / CAMELYON_METADATA} are missing, first: {missing[0]}")
        pending.append((site_dir, datalist))
    return _write_sites(out, pending)


# ----------------------------------------------------------------------------------------- dermoscopy

def read_dermoscopy_csv(path: str | Path, num_classes: int = len(DERMOSCOPY_CLASSES)) -> List[dict]:
    """Rows of one FedSkinLesion split CSV, with ``label`` as an int.

    Raises:
        SiteDataError: file missing, a required column (image_id, label, lesion_id) missing,
            a label not an integer in [0, num_classes), a ``dx`` that disagrees with the label.
    """
    path = Path(path)
    if not path.is_file():
        raise SiteDataError(f"split CSV not found: {path}")
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        header = reader.fieldnames or []
        missing = [c for c in ("image_id", "label", "lesion_id") if c not in header]
        if missing:
            raise SiteDataError(f"{path}: column(s) {missing} missing; header is {header!r}, expected "
                                f"{','.join(DERMOSCOPY_CSV_COLUMNS)}")
        rows = []
        for line, row in enumerate(reader, start=2):
            try:
                label = int(row["label"])
            except (TypeError, ValueError):
                raise SiteDataError(f"{path} line {line}: label {row['label']!r} is not an integer") from None
            if not 0 <= label < num_classes:
                raise SiteDataError(f"{path} line {line}: label {label} outside [0, {num_classes})")
            dx = row.get("dx")
            if dx and num_classes == len(DERMOSCOPY_CLASSES) and dx != DERMOSCOPY_CLASSES[label]:
                raise SiteDataError(f"{path} line {line}: dx {dx!r} disagrees with label {label} "
                                    f"({DERMOSCOPY_CLASSES[label]})")
            if not row["image_id"] or not row["lesion_id"]:
                raise SiteDataError(f"{path} line {line}: empty image_id or lesion_id")
            rows.append({**row, "label": label})
    return rows


def _find_split_csv(csv_folder: Path, client: str, stem: str) -> Path:
    """``<client>/<stem>_<client>.csv``, else the one ``<stem>_*.csv`` of the client folder
    (PRR-FL's own loader matches ``train_`` / ``valid_`` / ``test_`` by prefix)."""
    exact = dermoscopy_csv_path(csv_folder, client, stem)
    if exact.is_file():
        return exact
    others = sorted((csv_folder / client).glob(f"{stem}_*.csv")) if (csv_folder / client).is_dir() else []
    if len(others) == 1:
        return others[0]
    raise SiteDataError(f"split CSV not found: {exact}"
                        + (f" (several {stem}_*.csv there: {[o.name for o in others]})" if others else ""))


def prepare_dermoscopy(data_dir: str | Path, csv_folder: str | Path, out_dir: Optional[str | Path] = None,
                       clients: Optional[Sequence[str]] = None, image_folder: str = DERMOSCOPY_IMAGE_FOLDER,
                       check_files: bool = True) -> List[Path]:
    """Per-client ``datalist.json`` from the FedSkinLesion layout, keeping the released split.

    Args:
        data_dir: holds ``client{X}/img_resize128/<image_id>.png``.
        csv_folder: holds ``client{X}/{train,valid,test}_client{X}.csv`` (a single
            ``train_*.csv`` etc. per client folder is accepted too).
        out_dir: where the site folders (one per client) and ``sites.json`` go; default
            ``data_dir`` (the datalist lands in the client folder beside ``img_resize128``).
        clients: client folder names (default: every ``client*`` folder of ``csv_folder``, sorted).
        image_folder: image folder inside each client folder.
        check_files: every listed image must exist (decoding is left to the loader).

    Returns:
        The site folders, in client order.

    Raises:
        SiteDataError: a CSV missing or malformed, a lesion_id in two splits (the error names
            the lesion and both CSVs), an image_id listed twice, a listed image missing.
    """
    data_dir, csv_folder = Path(data_dir), Path(csv_folder)
    out = Path(out_dir) if out_dir is not None else data_dir
    if not csv_folder.is_dir():
        raise SiteDataError(f"CSV folder not found: {csv_folder}")
    if not clients:
        clients = sorted(d.name for d in csv_folder.iterdir() if d.is_dir() and d.name.startswith("client"))
    if not clients:
        raise SiteDataError(f"no client* folders in {csv_folder}")
    pending = []  # check every client before writing any datalist
    for client in clients:
        site_dir = out / client
        rel_images = os.path.relpath((data_dir / client / image_folder).resolve(), site_dir.resolve())
        datalist = {"classes": list(DERMOSCOPY_CLASSES), **{s: [] for s in SPLITS}}
        lesion_file: Dict[str, Path] = {}
        image_file: Dict[str, Path] = {}
        for stem, split in DERMOSCOPY_SPLIT_FILES.items():
            path = _find_split_csv(csv_folder, client, stem)
            for row in read_dermoscopy_csv(path):
                lesion, image_id = row["lesion_id"], row["image_id"]
                if lesion in lesion_file and lesion_file[lesion] != path:
                    raise SiteDataError(f"site {client!r}: lesion {lesion} appears in two splits: "
                                        f"{lesion_file[lesion]} and {path}; split by lesion")
                if image_id in image_file:
                    raise SiteDataError(f"site {client!r}: image {image_id} listed twice: "
                                        f"{image_file[image_id]} and {path}")
                lesion_file[lesion], image_file[image_id] = path, path
                image = data_dir / client / image_folder / f"{image_id}.png"
                if check_files and not image.is_file():
                    raise SiteDataError(f"site {client!r}: image {image} listed in {path} not found")
                datalist[split].append({"image": f"{rel_images}/{image_id}.png", "label": row["label"],
                                        "case": lesion})
        pending.append((site_dir, datalist))
    return _write_sites(out, pending)


# ----------------------------------------------------------------------------------------- loading

def check_image(path: str | Path, site: str = "") -> tuple:
    """Decode an image fully; raise :class:`SiteDataError` naming the file if it is missing,
    corrupt, not a single 2-D image or not RGB. Returns (height, width).

    An RGBA image whose alpha channel is fully opaque counts as RGB: the real Camelyon17-WILDS
    patches are saved that way (OpenSlide's ``read_region`` returns RGBA); readers must drop
    the alpha channel (``Image.convert("RGB")``).
    """
    from PIL import Image  # local: keep `import fedharmony` light

    where = f"site {site!r}: " if site else ""
    path = Path(path)
    if not path.is_file():
        raise SiteDataError(f"{where}image not found: {path}")
    try:
        with Image.open(path) as img:
            img.load()
            mode, size = img.mode, img.size
            n_frames = getattr(img, "n_frames", 1)
            opaque = mode != "RGBA" or img.getchannel("A").getextrema()[0] == 255
    except Exception as e:  # PIL raises many types for broken files
        raise SiteDataError(f"{where}cannot read image {path}: {type(e).__name__}: {e}") from None
    if n_frames != 1 or len(size) != 2:
        raise SiteDataError(f"{where}image {path} is not a single 2-D image ({n_frames} frames)")
    if mode not in ("RGB", "RGBA"):
        raise SiteDataError(f"{where}image {path} has mode {mode!r}; expected an RGB image")
    if not opaque:
        raise SiteDataError(f"{where}image {path} is RGBA with transparent pixels; expected an RGB image")
    return size[1], size[0]


def load_classification_datalist(datalist: str | Path, split: str, base_dir: Optional[str | Path] = None,
                                 site: str = "", num_classes: Optional[int] = None,
                                 check: bool = True) -> List[dict]:
    """Read one split of a classification site's datalist as ``[{"image": absolute path, "label": int, ...}]``.

    Args:
        datalist: the site's ``datalist.json``.
        split: ``training``, ``validation`` or ``testing``.
        base_dir: folder the relative image paths are relative to (default: the datalist's folder).
        site: site name for error messages.
        num_classes: labels must lie in [0, num_classes) (default: the datalist's ``classes`` count).
        check: decode every image (see :func:`check_image`).

    Raises:
        SiteDataError: datalist missing or not JSON, split missing or empty, an item without an
            image, a label missing / not an int / out of range, an image missing, corrupt, not
            RGB. The message names the site and the file.
    """
    datalist = Path(datalist)
    where = f"site {site!r}: " if site else ""
    items, content = read_split(datalist, split, site)
    if num_classes is None and isinstance(content.get("classes"), list):
        num_classes = len(content["classes"])
    base = Path(base_dir) if base_dir else datalist.parent
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("image"), str):
            raise SiteDataError(f"{where}datalist {datalist}: {split}[{i}] needs an 'image' path: {item!r}")
        image = (base / item["image"]).resolve()
        if "label" not in item:
            raise SiteDataError(f"{where}datalist {datalist}: {split}[{i}] ({image}) has no 'label'")
        label = item["label"]
        if isinstance(label, bool) or not isinstance(label, int):
            raise SiteDataError(f"{where}datalist {datalist}: {split}[{i}] ({image}) label {label!r} "
                                f"is not an integer class index")
        if label < 0 or (num_classes is not None and label >= num_classes):
            raise SiteDataError(f"{where}datalist {datalist}: {split}[{i}] ({image}) label {label} outside "
                                f"[0, {num_classes if num_classes is not None else '?'})")
        if check:
            check_image(image, site)
        out.append({**item, "image": str(image), "label": label})
    return out


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


IGNORED_FILES = ("datalist.json", "sites.json")


def find_images(folder: str | Path, exclude: Sequence[str | Path] = ()) -> Tuple[List[dict], List[dict]]:
    """The images of a folder for inference, and every other entry named with the reason it is not used.

    Returns ``(inputs, problems)``: ``inputs`` is ``[{"image": absolute path}]`` for each file with an
    image suffix (png, jpg, jpeg, bmp, tif, tiff), sorted; ``problems`` is ``[{"input": path,
    "reason": ...}]`` for any other file or sub-folder (hidden entries, ``datalist.json``,
    ``sites.json`` and the folders in ``exclude``, e.g. the output folder, are passed over). Whether an
    image file really opens is found out when it is loaded. Raises :class:`SiteDataError` if the
    folder does not exist.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise SiteDataError(f"input folder not found: {folder}")
    skip = {Path(e).resolve() for e in exclude}
    inputs, problems = [], []
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or p.name in IGNORED_FILES or p.resolve() in skip:
            continue
        if p.is_dir():
            problems.append({"input": str(p), "reason": "a folder: images are read from the top level only"})
        elif p.suffix.lower() in IMAGE_SUFFIXES:
            inputs.append({"image": str(p.resolve())})
        else:
            problems.append({"input": str(p), "reason": f"not an image file ({', '.join(IMAGE_SUFFIXES)})"})
    return inputs, problems


def class_counts(datalist_path: str | Path) -> Dict[str, Dict[str, int]]:
    """Images per class in each split: ``{split: {class name: count}}`` (class names from the
    datalist's ``classes``, else the label as a string). Files are not opened."""
    content = json.loads(Path(datalist_path).read_text())
    names = content.get("classes")
    out = {}
    for split in SPLITS:
        labels = [item["label"] for item in content.get(split, [])]
        n = len(names) if names else (max(labels) + 1 if labels else 0)
        counts = {(names[k] if names else str(k)): 0 for k in range(n)}
        for lab in labels:
            key = names[lab] if names and 0 <= lab < len(names) else str(lab)
            counts[key] = counts.get(key, 0) + 1
        out[split] = counts
    return out


def class_counts_markdown(site_dirs: Sequence[str | Path]) -> str:
    """Docs table: per site, images per class in each split, and cases (patients / lesions)."""
    rows, classes = [], None
    for d in site_dirs:
        d = Path(d)
        path = d / DATALIST_NAME
        counts = class_counts(path)
        content = json.loads(path.read_text())
        classes = classes or list(next(iter(counts.values())))
        cells = [" / ".join(str(counts[s].get(c, 0)) for c in classes) for s in SPLITS]
        cases = [len({item.get("case") for item in content.get(s, [])}) for s in SPLITS]
        total = sum(sum(c.values()) for c in counts.values())
        rows.append(f"| {d.name} | {total} | " + " | ".join(cells) + f" | {' / '.join(map(str, cases))} |")
    label = " / ".join(classes or [])
    head = [f"| site | images | training ({label}) | validation ({label}) | testing ({label}) | "
            f"cases train / val / test |", "|---|---|---|---|---|---|"]
    return "\n".join(head + rows)


def task_setting(tasks: Dict[str, dict], task: str, key: str):
    """``tasks[task][key]`` of the classification bundle's config, with an error that names the task."""
    if task not in tasks:
        raise KeyError(f"unknown task {task!r}; the bundle defines {sorted(tasks)}")
    if key not in tasks[task]:
        raise KeyError(f"task {task!r} has no {key!r} in the bundle's 'tasks'")
    return tasks[task][key]
