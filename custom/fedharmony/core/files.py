"""Files every part writes or reads the same way: atomic saves, and the site map (no NVFlare import).

The site map, ``sites.json`` at the root of a folder of site folders, maps simulator client
names (``site-1`` ... ``site-N``, in order) to the site folders, so ``nvflare simulator -n N``
finds each site's data and the job scripts can show each site by its folder's name.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, Sequence, Union

__all__ = ["SITE_MAP_NAME", "DATALIST_NAME", "atomic_torch_save", "atomic_write_text", "write_site_map", "read_site_map",
           "write_new_json", "read_json_files", "read_declaration"]

SITE_MAP_NAME = "sites.json"
DATALIST_NAME = "datalist.json"  # a site folder's split (fedharmony.data.datalist)

PathLike = Union[str, Path]


def atomic_torch_save(obj, path: PathLike) -> None:
    """``torch.save`` to a temporary file, then rename: a crash mid-write never leaves a truncated file."""
    import torch

    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def atomic_write_text(path: PathLike, text: str) -> None:
    """Write text through a temporary file and a rename (readers never see half a file)."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_new_json(path: PathLike, obj, overwrite: bool = False) -> Path:
    """``obj`` as indented JSON, atomically; an existing file is refused (FileExistsError) unless ``overwrite``.
    What a site's summary tools write: the file a site is about to send never silently replaces another."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists: pass --overwrite to replace it")
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")
    return path


def read_json_files(paths: Sequence[PathLike], what: str) -> list:
    """The JSON content of each file (what sites sent a coordinator); ValueError naming the file when one cannot
    be read or parsed (``what`` says what it should have been)."""
    out = []
    for path in paths:
        try:
            out.append(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: not {what} ({type(e).__name__}: {e})") from None
    return out


def read_declaration(path: PathLike, what: str, format_key: str, format_value: str, list_key: str,
                     fields: Sequence[str], optional: Sequence[str] = ()) -> list:
    """The entries of a small declaration file the repository keeps (the method guide's rows, the study queue):
    a JSON object whose ``format_key`` is ``format_value`` and whose ``list_key`` lists objects, each with exactly
    ``fields`` (and any of ``optional``), every one a non-empty string. Other top-level keys (``_doc``) are free.

    Raises:
        ValueError: naming ``what``, the file and, for a bad entry, its index and the fields it needs.
    """
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except OSError as e:
        raise ValueError(f"{what} {path}: cannot be read ({e})") from None
    except ValueError as e:
        raise ValueError(f"{what} {path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict) or raw.get(format_key) != format_value or not isinstance(raw.get(list_key), list):
        raise ValueError(f"{what} {path}: not a {what} file (needs \"{format_key}\": {format_value!r} and a list of "
                         f"{list_key})")
    for i, entry in enumerate(raw[list_key]):
        if not isinstance(entry, dict) or not set(fields) <= set(entry) <= set(fields) | set(optional) \
                or not all(isinstance(v, str) and v for v in entry.values()):
            also = f" (and optionally {', '.join(sorted(optional))})" if optional else ""
            raise ValueError(f"{what} {path}: {list_key}[{i}] needs exactly these non-empty strings: "
                             f"{', '.join(sorted(fields))}{also}")
    return [dict(entry) for entry in raw[list_key]]


def write_site_map(out_dir: PathLike, folders: Sequence[str]) -> Path:
    """Write ``<out_dir>/sites.json``: ``site-1`` -> the first folder name, and so on."""
    path = Path(out_dir) / SITE_MAP_NAME
    atomic_write_text(path, json.dumps({f"site-{i + 1}": str(f) for i, f in enumerate(folders)}, indent=2) + "\n")
    return path


def read_site_map(root: PathLike) -> Dict[str, str]:
    """``<root>/sites.json`` as a dict ({} when there is none).

    Raises:
        ValueError: the file is not a JSON object of names to folder names (the file is named).
    """
    path = Path(root) / SITE_MAP_NAME
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} is not readable JSON ({e})") from None
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
        raise ValueError(f"{path} must map site names to folder names, e.g. {{\"site-1\": \"BIDMC\"}}")
    return data
