"""The IOP-FL model pool: the global model and the sites' personalized models, on disk (no NVFlare import).

Layout of a pool folder::

    manifest.json       which file is which expert, its sha256, and how to build the network
    global.pt           the final global model            (a plain state dict)
    site-1.pt ...       each site's personalized model     (a plain state dict)

Each ``.pt`` file is a state dict of the bundle's ``network_def``, so the bundle's own
``configs/inference.json`` loads any of them (``--ckpt_path pool/site-1.pt``). The
manifest records the bundle configs and overrides the federation used, so the routed
network is built with the same architecture, and the global model is always the last
expert (the routing order).

A pool is data that reaches a site from outside (a hospital that never took part
receives it), so :func:`load_pool` treats every part of it as untrusted before anything
is built (:func:`validate_manifest`):

* the overrides pass the same allow-list as a no-code job's
  (:func:`fedharmony.bundle.job_policy.validate_overrides`: plain values on the bundle's
  tunable ids; no ``$`` expression, ``@`` reference, ``%`` macro, nested config or path id),
  because they go into the bundle's config parser when the experts are built;
* ``config_files`` must be ``configs/<name>.json`` files of the installed bundle;
* each expert's ``file`` is a plain file name inside the pool folder (no ``..``, no
  absolute path, no link that leads out), and its recorded sha256 must match the bytes on
  disk (a missing, swapped or truncated file is named);
* the weights are read with ``torch.load(weights_only=True)`` (no pickled code) and must be
  finite and of one architecture.

A pool written before digests were recorded (format ``fedharmony-model-pool/1``) is refused
with the command that re-stamps it (:func:`stamp_pool`, ``tools/model_pool.py stamp``): only
its owner can say its files are the ones the federation wrote.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from fedharmony.core.files import atomic_torch_save, atomic_write_text
from fedharmony.bundle import job_policy

import torch

__all__ = ["MANIFEST", "GLOBAL", "FORMAT", "OLD_FORMATS", "PoolError", "ModelPool", "write_pool", "read_manifest",
           "validate_manifest", "load_pool", "stamp_pool", "file_digest", "check_same_architecture"]

MANIFEST = "manifest.json"
GLOBAL = "global"
FORMAT = "fedharmony-model-pool/2"  # /2: every expert carries the sha256 of its file
OLD_FORMATS = ("fedharmony-model-pool/1",)
EXPERT_KINDS = ("personalized", GLOBAL)
EXPERT_FIELDS = ("name", "kind", "file", "sha256")
EXPERT_INFO = ("data", "best_round", "best_metric")  # facts about an expert: plain values, never parsed
RESTAMP = "python tools/model_pool.py stamp POOL_DIR"
_DIGEST_LENGTH = len("sha256:") + 64


class PoolError(ValueError):
    """A model pool that cannot be used (missing expert, mismatched architectures, bad manifest)."""


def write_pool(out_dir: str | Path, global_model: Mapping[str, object],
               personalized: Mapping[str, Mapping[str, object]],
               config_files: Sequence[str] = ("configs/train.json",), overrides: Optional[dict] = None,
               info: Optional[Dict[str, dict]] = None, job: Optional[dict] = None) -> Path:
    """Write a pool folder; returns the manifest's path.

    Args:
        out_dir: folder to write (created; existing expert files of the same names are replaced).
        global_model: the global state dict (tensors or NumPy arrays).
        personalized: ``{site name: state dict}``, one personalized model per site.
        config_files, overrides: how the federation built ``network_def`` from the bundle.
        info: optional per-expert facts for the manifest (``{name: {"data": "BIDMC", ...}}``).
        job: optional facts about the job (name, algorithm, rounds).
    """
    if not personalized:
        raise PoolError("a model pool needs at least one personalized model")
    if GLOBAL in personalized:
        raise PoolError(f"{GLOBAL!r} is reserved for the global model; rename that site")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    info = info or {}
    models = {n: personalized[n] for n in sorted(personalized)}
    models[GLOBAL] = global_model
    models = {n: {k: torch.as_tensor(v).clone() for k, v in sd.items()} for n, sd in models.items()}
    check_same_architecture(models)
    experts = []
    for name, sd in models.items():
        path = out / f"{name}.pt"
        atomic_torch_save(sd, path)  # a reader never sees half a file
        experts.append({"name": name, "kind": GLOBAL if name == GLOBAL else "personalized", "file": path.name,
                        "sha256": file_digest(path), **info.get(name, {})})
    manifest = {"format": FORMAT, "experts": experts, "config_files": list(config_files),
                "overrides": dict(overrides or {}), "job": job or {},
                "_doc": "experts in routing order, the global model last; each file is a state dict of the "
                        "bundle's network_def built from config_files + overrides, with the sha256 of its bytes"}
    path = out / MANIFEST
    atomic_write_text(path, json.dumps(manifest, indent=2) + "\n")
    return path


def file_digest(path: str | Path) -> str:
    """``sha256:<hex>`` of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return "sha256:" + h.hexdigest()


def check_same_architecture(models: Mapping[str, Mapping[str, torch.Tensor]]):
    """Every model must have the same keys and shapes; the error names the expert and the key."""
    names = list(models)
    ref_name = names[-1]
    ref = models[ref_name]
    for name in names[:-1]:
        sd = models[name]
        missing, extra = sorted(set(ref) - set(sd)), sorted(set(sd) - set(ref))
        if missing or extra:
            raise PoolError(f"expert {name!r} does not match {ref_name!r}: missing keys {missing[:3]}, "
                            f"unexpected keys {extra[:3]}")
        for k, v in sd.items():
            if tuple(v.shape) != tuple(ref[k].shape):
                raise PoolError(f"expert {name!r} does not match {ref_name!r}: {k!r} has shape {tuple(v.shape)}, "
                                f"{ref_name!r} has {tuple(ref[k].shape)}")


# the training settings routed inference must repeat: read from the bundle's configs under the pool's overrides
INFERENCE_SETTINGS = ("image_size", "pixdim", "intensity", "num_classes")


@dataclass
class ModelPool:
    """A loaded pool: expert networks in routing order (global last), the training settings inference repeats
    (:data:`INFERENCE_SETTINGS`: the bundle's values under the pool's overrides, as the experts were trained) and
    the manifest."""

    names: List[str]
    kinds: List[str]
    experts: List[torch.nn.Module]
    training: Dict[str, Any]
    manifest: dict = field(repr=False)

    @property
    def overrides(self) -> dict:
        return dict(self.manifest.get("overrides", {}))

    @property
    def image_size(self) -> int:
        """The in-plane size the federation trained at (-1: each volume's own)."""
        return int(self.training["image_size"])

    @property
    def pixdim(self) -> float:
        """The in-plane spacing in mm the federation resampled to (0: each volume's own)."""
        return float(self.training["pixdim"])

    @property
    def num_classes(self) -> int:
        """The classes the experts output, background included."""
        return int(self.training["num_classes"])

    @property
    def intensity(self) -> str:
        """How the federation scaled intensities (``zscore``, ``released`` or ``raw``; see fedharmony.bundle.intensity)."""
        return str(self.training["intensity"])


def read_manifest(pool_dir: str | Path) -> dict:
    """The pool's manifest, after the checks that need no bundle (format, experts, file names, digests).

    Raises:
        PoolError: no manifest, not JSON, an old format without digests, or a malformed entry
            (the message names the pool, the entry and the reason).
    """
    manifest = _read_json(pool_dir)
    fmt = manifest.get("format")
    if fmt in OLD_FORMATS:
        raise PoolError(f"model pool {pool_dir}: format {fmt!r} records no digest of its expert files, so a "
                        f"swapped or truncated file cannot be told; if you trust this pool's files (you made it), "
                        f"re-stamp it: {RESTAMP}")
    _check_structure(manifest, pool_dir, need_digests=True)
    return manifest


def validate_manifest(pool_dir: str | Path, bundle_root: str | Path) -> dict:
    """Everything in the manifest that reaches the bundle's config parser, checked as a no-code job's is.

    ``config_files`` must be ``configs/<name>.json`` files of the installed bundle at
    ``bundle_root``, and ``overrides`` plain values on the ids of its ``configs/tunables.json``
    (:func:`fedharmony.bundle.job_policy.validate_overrides`): a pool is data, and a MONAI
    expression in it would run at the site when the experts are built.

    Example::

        >>> validate_manifest("pool", "bundles/prostate_mri_seg")   # doctest: +SKIP
        PoolError: model pool pool: manifest 'overrides' refused: override 'base_features': the value starts
        with '$' (a MONAI expression), which the site would evaluate; only plain values are accepted

    Raises:
        PoolError: naming the pool, the key and the reason; nothing has been built.
    """
    manifest = read_manifest(pool_dir)
    _check_bundle_fields(manifest, pool_dir, bundle_root)
    return manifest


def load_pool(pool_dir: str | Path, bundle_root: str | Path, device: str | torch.device = "cpu") -> ModelPool:
    """Validate the pool (:func:`validate_manifest`), then build every expert from the bundle's
    ``network_def`` and load its weights.

    Raises:
        PoolError: a refused manifest, a missing or unreadable expert file, one whose bytes differ
            from its recorded digest, NaN/Inf weights, or experts whose keys/shapes differ from each
            other or from the bundle's network.
    """
    from fedharmony.bundle.networks import build_network, bundle_parser

    manifest = validate_manifest(pool_dir, bundle_root)
    weights, _ = _load_weights(pool_dir, manifest, check_digests=True)
    experts = []
    for e in manifest["experts"]:
        net = build_network(str(bundle_root), manifest["config_files"], overrides=manifest["overrides"], seed=None)
        try:
            net.load_state_dict(weights[e["name"]])
        except RuntimeError as err:
            raise PoolError(f"expert {e['name']!r} does not fit the bundle's network_def: {err}") from None
        experts.append(net.to(device).eval())
    parser = bundle_parser(str(bundle_root), manifest["config_files"], manifest["overrides"])
    missing = [k for k in INFERENCE_SETTINGS if k not in parser]
    if missing:
        raise PoolError(f"bundle {bundle_root} does not define {missing} in {manifest['config_files']}: routed "
                        f"inference cannot repeat the pool's training")
    training = {k: parser.get_parsed_content(k) for k in INFERENCE_SETTINGS}
    return ModelPool([e["name"] for e in manifest["experts"]], [e["kind"] for e in manifest["experts"]], experts,
                     training, manifest)


def stamp_pool(pool_dir: str | Path, bundle_root: str | Path) -> Path:
    """Record the digest of each expert file of a pool written before digests existed (or re-record them).

    For the pool's owner only: it vouches that the files on disk now are the federation's. The
    manifest must pass every other check of :func:`validate_manifest`, and every expert must load
    (finite weights, one architecture) before anything is written; the manifest is then rewritten
    (atomically) in the current format. Returns the manifest's path.
    """
    manifest = _read_json(pool_dir)
    _check_structure(manifest, pool_dir, need_digests=False)
    _check_bundle_fields(manifest, pool_dir, bundle_root)
    _, digests = _load_weights(pool_dir, manifest, check_digests=False)
    for e in manifest["experts"]:
        e["sha256"] = digests[e["name"]]
    manifest["format"] = FORMAT
    path = Path(pool_dir) / MANIFEST
    atomic_write_text(path, json.dumps(manifest, indent=2) + "\n")
    return path


def _read_json(pool_dir) -> dict:
    path = Path(pool_dir) / MANIFEST
    if not path.is_file():
        raise PoolError(f"no {MANIFEST} in {pool_dir} (not a model pool folder: an IOP-FL job writes one to "
                        "<server run dir>/model_pool/)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PoolError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(manifest, dict):
        raise PoolError(f"{path} is not a JSON object")
    return manifest


def _plain(value) -> bool:
    return value is None or isinstance(value, (bool, int, str)) or (isinstance(value, float) and math.isfinite(value))


def _check_structure(manifest: dict, pool_dir, need_digests: bool) -> None:
    """The manifest's shape, names, files and digests (no bundle needed). Fills in the defaults."""
    where = f"model pool {pool_dir}"
    unknown = sorted(set(manifest) - {"format", "experts", "config_files", "overrides", "job", "_doc"})
    if unknown:
        raise PoolError(f"{where}: unknown manifest keys {unknown}")
    fmt = manifest.get("format")
    if fmt not in (FORMAT, *OLD_FORMATS):
        raise PoolError(f"{where}: manifest format {fmt!r} is not one this version reads ({FORMAT!r})")
    job = manifest.setdefault("job", {})
    if not isinstance(job, dict) or not all(_plain(v) for v in job.values()):
        raise PoolError(f"{where}: manifest 'job' must be an object of plain values")
    experts = manifest.get("experts")
    if not experts or not isinstance(experts, list):
        raise PoolError(f"{where}: the manifest lists no experts")
    incomplete = [e for e in experts if not isinstance(e, dict) or not {"name", "kind", "file"} <= set(e)]
    if incomplete:
        raise PoolError(f"{where}: every expert needs 'name', 'kind' and 'file'; got {incomplete[:2]}")
    kinds = [e.get("kind") for e in experts]
    if kinds.count(GLOBAL) != 1 or kinds[-1] != GLOBAL or len(experts) < 2 or not set(kinds) <= set(EXPERT_KINDS):
        raise PoolError(f"{where}: need personalized experts followed by exactly one global model (last); got {kinds}")
    root = Path(pool_dir).resolve()
    names, files = set(), set()
    for e in experts:
        name, file = e["name"], e["file"]
        if not isinstance(name, str) or not job_policy.is_plain_name(name) or name in names:
            raise PoolError(f"{where}: expert name {name!r} is not a plain, unique name")
        if not isinstance(file, str) or not job_policy.is_plain_name(file) or file in files:
            raise PoolError(f"{where}: expert {name!r}: file {file!r} is not a plain file name inside the pool "
                            f"folder (no folders, no '..', no absolute path, each file once)")
        target = (Path(pool_dir) / file).resolve()
        if target.parent != root:
            raise PoolError(f"{where}: expert {name!r}: file {file!r} leads out of the pool folder (a link)")
        names.add(name)
        files.add(file)
        digest = e.get("sha256")
        if need_digests and not (isinstance(digest, str) and _DIGEST_LENGTH == len(digest)
                                 and digest.startswith("sha256:")):
            raise PoolError(f"{where}: expert {name!r} has no valid 'sha256' digest of its file")
        odd = [k for k, v in e.items() if k not in EXPERT_FIELDS and (k not in EXPERT_INFO or not _plain(v))]
        if odd:
            raise PoolError(f"{where}: expert {name!r}: unexpected entries {odd} (facts about an expert are "
                            f"{list(EXPERT_INFO)}, plain values)")



def _check_bundle_fields(manifest: dict, pool_dir, bundle_root) -> None:
    """``config_files`` and ``overrides``: what goes into the bundle's config parser. Fills in the defaults."""
    where = f"model pool {pool_dir}"
    try:
        manifest["config_files"] = job_policy.check_config_files(
            bundle_root, manifest.get("config_files", ["configs/train.json"]))
    except job_policy.PolicyError as e:
        raise PoolError(f"{where}: manifest 'config_files' refused: {e}") from None
    try:
        manifest["overrides"] = job_policy.validate_overrides(manifest.get("overrides", {}),
                                                              job_policy.load_tunables(bundle_root))
    except job_policy.PolicyError as e:
        raise PoolError(f"{where}: manifest 'overrides' refused: {e}") from None


def _load_weights(pool_dir, manifest: dict, check_digests: bool) -> Tuple[Dict[str, dict], Dict[str, str]]:
    """``({name: state dict}, {name: sha256 of the bytes loaded})``; each file is read once, so the bytes that
    are checked are the bytes that are loaded."""
    weights, digests = {}, {}
    for e in manifest["experts"]:
        path = Path(pool_dir) / e["file"]
        if not path.is_file():
            raise PoolError(f"expert {e['name']!r}: file {path} is missing")
        data = path.read_bytes()
        digests[e["name"]] = on_disk = "sha256:" + hashlib.sha256(data).hexdigest()
        if check_digests and on_disk != e["sha256"]:
            raise PoolError(f"expert {e['name']!r}: {path} does not match its digest in the manifest "
                            f"({e['sha256'][:19]}... recorded, {on_disk[:19]}... on disk): the file was "
                            f"changed, swapped or truncated after the pool was written")
        try:
            sd = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as err:
            raise PoolError(f"expert {e['name']!r}: cannot read {path} ({err})") from None
        sd = sd.get("model", sd) if isinstance(sd, dict) else sd
        if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
            raise PoolError(f"expert {e['name']!r}: {path} is not a state dict of tensors")
        bad = [k for k, v in sd.items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:
            raise PoolError(f"expert {e['name']!r}: {path} holds NaN/Inf in {bad[:3]}")
        weights[e["name"]] = sd
    check_same_architecture(weights)
    return weights, digests
