"""The IOP-FL model pool: the global model and the sites' personalized models, on disk (no NVFlare import).

Layout of a pool folder::

    manifest.json       which file is which expert, and how to build the network
    global.pt           the final global model            (a plain state dict)
    site-1.pt ...       each site's personalized model     (a plain state dict)

Each ``.pt`` file is a state dict of the bundle's ``network_def``, so the bundle's own
``configs/inference.json`` loads any of them (``--ckpt_path pool/site-1.pt``). The
manifest records the bundle configs and overrides the federation used, so the routed
network is built with the same architecture, and the global model is always the last
expert (the routing order).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

from fedharmony.core.files import atomic_torch_save

import torch

MANIFEST = "manifest.json"
GLOBAL = "global"


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
        experts.append({"name": name, "kind": "global" if name == GLOBAL else "personalized", "file": path.name,
                        **info.get(name, {})})
    manifest = {"format": "fedharmony-model-pool/1", "experts": experts, "config_files": list(config_files),
                "overrides": dict(overrides or {}), "job": job or {},
                "_doc": "experts in routing order, the global model last; each file is a state dict of the "
                        "bundle's network_def built from config_files + overrides"}
    path = out / MANIFEST
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path


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


@dataclass
class ModelPool:
    """A loaded pool: expert networks in routing order (global last) and the manifest."""

    names: List[str]
    kinds: List[str]
    experts: List[torch.nn.Module]
    manifest: dict = field(repr=False)

    @property
    def overrides(self) -> dict:
        return dict(self.manifest.get("overrides", {}))

    @property
    def image_size(self) -> int:
        """The in-plane size the federation trained at (-1: each volume's own)."""
        return int(self.overrides.get("image_size", -1))

    @property
    def pixdim(self) -> float:
        """The in-plane spacing in mm the federation resampled to (0: each volume's own)."""
        return float(self.overrides.get("pixdim", 0.0))

    @property
    def intensity(self) -> str:
        """How the federation scaled intensities (``zscore``, ``released`` or ``raw``; see fedharmony.bundle.intensity)."""
        return str(self.overrides.get("intensity", "zscore"))


def read_manifest(pool_dir: str | Path) -> dict:
    path = Path(pool_dir) / MANIFEST
    if not path.is_file():
        raise PoolError(f"no {MANIFEST} in {pool_dir} (not a model pool folder: an IOP-FL job writes one to "
                        "<server run dir>/model_pool/)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise PoolError(f"{path} is not valid JSON: {e}") from None
    experts = manifest.get("experts")
    if not experts or not isinstance(experts, list):
        raise PoolError(f"{path} lists no experts")
    incomplete = [e for e in experts if not isinstance(e, dict) or not {"name", "kind", "file"} <= set(e)]
    if incomplete:
        raise PoolError(f"{path}: every expert needs 'name', 'kind' and 'file'; got {incomplete[:2]}")
    kinds = [e.get("kind") for e in experts]
    if kinds.count("global") != 1 or kinds[-1] != "global" or len(experts) < 2:
        raise PoolError(f"{path}: need personalized experts followed by exactly one global model (last); got {kinds}")
    return manifest


def load_pool(pool_dir: str | Path, bundle_root: str | Path, device: str | torch.device = "cpu") -> ModelPool:
    """Build every expert from the bundle's ``network_def`` and load its weights.

    Raises:
        PoolError: no manifest, a missing or unreadable expert file, NaN/Inf weights, or
            experts whose keys/shapes differ from each other or from the bundle's network.
    """
    from fedharmony.bundle.site import build_network

    manifest = read_manifest(pool_dir)
    weights = {}
    for e in manifest["experts"]:
        path = Path(pool_dir) / e["file"]
        if not path.is_file():
            raise PoolError(f"expert {e['name']!r}: file {path} is missing")
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise PoolError(f"expert {e['name']!r}: cannot read {path} ({err})") from None
        weights[e["name"]] = sd = sd.get("model", sd) if isinstance(sd, dict) else sd
        bad = [k for k, v in sd.items() if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:
            raise PoolError(f"expert {e['name']!r}: {path} holds NaN/Inf in {bad[:3]}")
    check_same_architecture(weights)
    experts = []
    for e in manifest["experts"]:
        net = build_network(str(bundle_root), manifest.get("config_files", ["configs/train.json"]),
                            overrides=manifest.get("overrides"), seed=None)
        try:
            net.load_state_dict(weights[e["name"]])
        except RuntimeError as err:
            raise PoolError(f"expert {e['name']!r} does not fit the bundle's network_def: {err}") from None
        experts.append(net.to(device).eval())
    return ModelPool([e["name"] for e in manifest["experts"]], [e["kind"] for e in manifest["experts"]], experts,
                     manifest)
