"""A study's data: phantom sites per seed with a separate, larger test draw, or prepared real data
(no NVFlare import).

Phantom data for seed ``s`` is two draws from the same scanner profiles:

* the *training draw* (generator seed ``s``), in the task's real layout with its usual
  training / validation / testing split: this is what the federated job and the local and
  pooled references train and validate on;
* the *test draw* (generator seed ``s + TEST_DRAW_OFFSET``), ``test_cases`` new cases per
  site (volumes, or images in the profile's class proportions), none of them seen in
  training: every method is scored on all of them. Its datalists hold one ``testing`` list.

So each study seed varies the data as well as the training. Real data (a folder of prepared
site folders with ``sites.json``) is used as it is: train and test on its own splits.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Dict, Optional

from fedharmony.core.files import atomic_write_text
from fedharmony.data.datalist import write_datalist

__all__ = ["TEST_DRAW_OFFSET", "StudyData", "make_phantom_data", "real_data", "pooled_dataset", "iid_dataset",
           "site_map"]

TEST_DRAW_OFFSET = 1_000_003
SPLITS = ("training", "validation", "testing")
READY = "study_data.json"


class StudyData(dict):
    """``{"train_root", "test_root", "sites": {client name: site folder name}}`` (a dict, so it is JSON)."""

    @property
    def train_root(self) -> Path:
        return Path(self["train_root"])

    @property
    def test_root(self) -> Path:
        return Path(self["test_root"])

    @property
    def sites(self) -> Dict[str, str]:
        return dict(self["sites"])


def site_map(root) -> Dict[str, str]:
    """``sites.json`` of a data root: simulator client names (``site-1`` ...) to site folders."""
    path = Path(root) / "sites.json"
    if not path.is_file():
        raise FileNotFoundError(f"{root} has no sites.json (client name -> site folder)")
    mapping = json.loads(path.read_text())
    missing = [folder for folder in mapping.values() if not (Path(root) / folder / "datalist.json").is_file()]
    if missing:
        raise FileNotFoundError(f"{root}: site folder(s) without datalist.json: {missing}")
    return mapping


def _write_draw(task: str, out: Path, seed: int, sites: Optional[int], data: dict, cases: Optional[int] = None):
    """One phantom draw of ``task`` into ``out``; ``cases`` overrides the size (the test draw)."""
    data = dict(data)
    if task == "prostate":
        from fedharmony.phantom import load_profiles
        from fedharmony.phantom._common import default_workers
        from fedharmony.phantom.sites import write_sites

        profiles = list(load_profiles().values())[:sites]
        write_sites(out, profiles, seed=seed, cases=cases or data.get("cases"), size=data.get("size", 96),
                    slices=data.get("slices"), workers=default_workers())
    elif task == "prostate_v2":
        from fedharmony.phantom._common import default_workers
        from fedharmony.phantom.prostate_mr import load_v2_profiles, write_sites_v2

        profiles = list(load_v2_profiles().values())[:sites]
        write_sites_v2(out, profiles, seed=seed, cases=cases or data.get("cases"), workers=default_workers(),
                       voxel_scale=data.get("voxel_scale", 1.0))
    elif task == "brain":
        from fedharmony.phantom._common import default_workers
        from fedharmony.phantom.brain_mr import load_brain_profiles, write_brain_sites

        profiles = list(load_brain_profiles().values())[:sites]
        write_brain_sites(out, profiles, seed=seed, cases=cases or data.get("cases"), workers=default_workers(),
                          voxel_scale=data.get("voxel_scale", 1.0), grid_mm=data.get("grid_mm", 1.5))
    elif task == "dermoscopy":
        from fedharmony.phantom._common import default_workers
        from fedharmony.phantom.dermoscopy import load_dermoscopy_profiles, write_dermoscopy_sites

        profiles = list(load_dermoscopy_profiles().values())[:sites]
        write_dermoscopy_sites(out, profiles, seed=seed, images_per_site=cases or data.get("images_per_site", 200),
                               size=data.get("size", 128), workers=default_workers())
    elif task == "histology":
        from fedharmony.phantom._common import default_workers
        from fedharmony.phantom.histology import load_histology_profiles, write_histology_sites

        profiles = list(load_histology_profiles().values())[:sites]
        if cases:  # the test draw: this many patches per hospital, over the hospital's own patients
            kwargs = {"patches_per_hospital": cases}
        else:
            kwargs = {k: data[k] for k in ("patients", "patches_per_patient", "patches_per_hospital") if k in data}
        write_histology_sites(out, profiles, seed=seed, size=data.get("size", 96), workers=default_workers(),
                              **kwargs)
    else:
        raise ValueError(f"no phantom generator for task {task!r}")


def _label_sets(site_dirs) -> list:
    """The datalist file names every one of ``site_dirs`` holds: ``datalist.json`` first, then other label sets
    (``datalist_<name>.json``, e.g. the brain phantom's tissue labels) in name order."""
    common = None
    for site_dir in site_dirs:
        names = {p.name for p in Path(site_dir).glob("datalist_*.json")}
        common = names if common is None else common & names
    return ["datalist.json"] + sorted(common or ())


def _all_to_testing(root: Path) -> None:
    """Turn every site datalist of a draw (each label set's) into a single ``testing`` list (all its cases)."""
    for folder in site_map(root).values():
        for name in _label_sets([root / folder]):
            content = json.loads((root / folder / name).read_text())
            items = [item for split in SPLITS for item in content.get(split, [])]
            out = {k: v for k, v in content.items() if k not in SPLITS}
            out["testing"] = items
            write_datalist(root / folder, out, folder, name)


def make_phantom_data(task: str, out_dir, seed: int, sites: Optional[int], data: dict, test_cases: int) -> StudyData:
    """Both draws of seed ``seed`` under ``out_dir`` (``train/`` and ``test/``); reused when already written
    with the same arguments."""
    out = Path(out_dir)
    settings = {"task": task, "seed": seed, "sites": sites, "data": data, "test_cases": test_cases}
    ready = out / READY
    if ready.is_file():
        try:
            done = json.loads(ready.read_text())
            if done.get("settings") == settings:
                return StudyData(done["data"])
        except (json.JSONDecodeError, KeyError):
            pass  # a half-written marker: write the data again
    if test_cases < 1:
        raise ValueError(f"test_cases must be >= 1, got {test_cases}")
    for sub in ("train", "test"):
        shutil.rmtree(out / sub, ignore_errors=True)
    _write_draw(task, out / "train", seed, sites, data)
    _write_draw(task, out / "test", seed + TEST_DRAW_OFFSET, sites, data, cases=test_cases)
    _all_to_testing(out / "test")
    train_sites, test_sites = site_map(out / "train"), site_map(out / "test")
    if train_sites != test_sites:
        raise RuntimeError(f"the test draw's sites {test_sites} differ from the training draw's {train_sites}")
    result = StudyData(train_root=str(out / "train"), test_root=str(out / "test"), sites=train_sites)
    tmp = ready.with_suffix(".tmp")
    tmp.write_text(json.dumps({"settings": settings, "data": result}, indent=2))
    os.replace(tmp, ready)
    return result


def real_data(root) -> StudyData:
    """Prepared real data: every site folder's own datalist splits, unchanged."""
    root = Path(root).resolve()
    return StudyData(train_root=str(root), test_root=str(root), sites=site_map(root))


def _absolute_items(site_dir: Path, items, site: str) -> list:
    """A datalist's items with their file paths made absolute, each tagged with the site it came from."""
    out = []
    for item in items:
        entry = dict(item)
        for key in ("image", "label"):
            if isinstance(entry.get(key), str):
                entry[key] = str((site_dir / entry[key]).resolve())
        entry["site"] = site
        out.append(entry)
    return out


def pooled_dataset(data: StudyData, out_dir) -> Path:
    """One site folder whose datalist pools every site's training and validation lists (absolute
    paths): the centralized reference trains on it. Its ``testing`` list is the pooled test set."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = _label_sets([root / f for root in (data.train_root, data.test_root) for f in data.sites.values()])
    for name in names:  # one pooled datalist per label set the sites share
        pooled = {s: [] for s in SPLITS}
        extra = {}
        for root, splits in ((data.train_root, ("training", "validation")), (data.test_root, ("testing",))):
            for folder in data.sites.values():
                site_dir = root / folder
                content = json.loads((site_dir / name).read_text())
                extra.update({k: v for k, v in content.items() if k not in SPLITS})
                for split in splits:
                    pooled[split] += _absolute_items(site_dir, content.get(split, []), folder)
        write_datalist(out, {**extra, **pooled}, "pooled", name)
    return out


def iid_dataset(data: StudyData, out_dir, seed: int) -> StudyData:
    """The headroom control's data: the same training and validation cases, re-dealt so that every site
    holds the same mix of every site's cases, each site keeping its own number of cases per split.

    Per split, every site's cases are shuffled (generator ``seed``) and laid out in one sequence that
    interleaves the sites in proportion to their sizes (each case at the position ``(i + 0.5) / n`` of
    its site's ``n`` cases); cutting that sequence into the sites' own sizes gives each site the
    same proportions of every source, up to rounding. Paths become absolute; each item keeps the
    site it came from as ``site``. Test data are not touched: every site is still scored on its own
    test split (``test_root`` is unchanged). Returns a :class:`StudyData` whose ``train_root`` holds
    the re-dealt site folders and ``sites.json``.

    Example::

        >>> iid = iid_dataset(data, "out/iid", seed=0)     # doctest: +SKIP
        >>> sorted({item["site"] for item in load_datalist(iid.train_root / "BIDMC" / "datalist.json", "training")})
        ['BIDMC', 'BMC', 'HK', 'I2CVB', 'RUNMC', 'UCL']
    """
    import numpy as np

    out = Path(out_dir)
    rng = np.random.default_rng(seed)
    folders = list(data.sites.values())
    names = _label_sets([data.train_root / f for f in folders])
    sets = {name: {f: json.loads((data.train_root / f / name).read_text()) for f in folders} for name in names}
    contents = sets["datalist.json"]
    # the deal is drawn once, on datalist.json, as (source site, index) per place; every label set follows it
    deal: Dict[str, Dict[str, list]] = {f: {} for f in folders}
    for split in ("training", "validation"):
        keyed = []
        for f in folders:
            order = rng.permutation(len(contents[f].get(split, [])))
            keyed += [((rank + 0.5) / len(order), f, int(j)) for rank, j in enumerate(order)]
        keyed.sort(key=lambda k: (k[0], folders.index(k[1])))
        start = 0
        for f in folders:
            size = len(contents[f].get(split, []))
            deal[f][split] = [(source, j) for _, source, j in keyed[start:start + size]]
            start += size
    shutil.rmtree(out, ignore_errors=True)
    for f in folders:
        (out / f).mkdir(parents=True)
    for name, content in sets.items():
        for f in folders:
            dealt = {k: v for k, v in content[f].items() if k not in SPLITS}
            for split, places in deal[f].items():
                dealt[split] = [_absolute_items(data.train_root / source, [content[source][split][j]], source)[0]
                                for source, j in places]
            write_datalist(out / f, dealt, f, name)
    atomic_write_text(out / "sites.json", json.dumps(data.sites, indent=2) + "\n")
    return StudyData(train_root=str(out), test_root=str(data.test_root), sites=data.sites)
