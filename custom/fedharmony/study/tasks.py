"""What a study can run: tasks, methods, presets (no NVFlare import).

A *task* is a bundle, a job script and the phantom sites that stand in for its real data.
A *method* is a federated algorithm run as the task's real NVFlare job, or one of the two
references every FL paper reports: ``local`` (each site trained alone) and ``pooled`` (one
model trained on all sites' training data together, for the same epochs), or one of the two
*headroom controls*, which say how much a method fighting site heterogeneity could recover:

* ``fedavg_iid``: FedAvg's job on the same training and validation cases re-dealt so that every
  site holds the same mix of every site's cases (sizes per site unchanged; each site's test draw
  is its own, as for FedAvg). Its score minus FedAvg's is the *heterogeneity penalty*.
* ``pooled_steps``: one model on all sites' pooled data, trained for as many optimizer steps as
  FedAvg's global model takes (rounds x local epochs x the mean site's steps per epoch), not for
  the same epochs (``pooled`` takes about as many steps as all sites together). Its score minus
  FedAvg's is the *federation penalty* at an equal training budget.

An *arm* is a method with bundle settings of its own, written ``METHOD+key=value[+key=value]``
(``fedavg+pixdim=1.5``): the same job and data as the method, with those config values overridden.
Arms compare one setting (spacing normalization, an intensity mode) paired over the same seeds.

A *preset* sizes a study for a machine: ``smoke`` (2 sites, 2 rounds, tiny data: the CI
test), ``standard`` (every site of the task, sized for a 2-core CPU), ``paper`` (the
papers' sizes, for a GPU).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

from fedharmony.methods.protocols import check_protocol
from fedharmony import methods as registry

__all__ = ["FEDERATED", "REFERENCES", "CONTROLS", "CENTRALIZED", "METHODS", "PERSONALIZED", "JOB_ALGORITHM",
           "TaskSpec", "Preset", "TASKS", "PRESETS", "preset_for", "check_methods", "scored_model", "parse_arm",
           "job_algorithm"]

FEDERATED = registry.METHODS
REFERENCES = ("local", "pooled")
CONTROLS = ("fedavg_iid", "pooled_steps")
CENTRALIZED = ("local", "pooled", "pooled_steps")  # trained by fedharmony.study.centralized, without NVFlare
METHODS = FEDERATED + REFERENCES + CONTROLS
JOB_ALGORITHM = {"fedavg_iid": "fedavg"}  # a control that runs a federated job: the job's algorithm
# the methods whose sites each end with their own model (best on its validation split), not the global one
PERSONALIZED = tuple(m for m in FEDERATED if registry.site_method_class(m).personalized)


_SETTING = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=(.+)$")


def parse_arm(arm: str) -> Tuple[str, Dict[str, object]]:
    """``"fedavg+pixdim=1.5+image_size=96"`` -> ``("fedavg", {"pixdim": 1.5, "image_size": 96})``.

    Values are read as JSON (numbers, true/false, null) and otherwise kept as strings. A plain
    method name is an arm without settings.
    """
    base, *parts = str(arm).split("+")
    settings: Dict[str, object] = {}
    for part in parts:
        m = _SETTING.match(part)
        if not m:
            raise ValueError(f"arm {arm!r}: {part!r} is not key=value (write METHOD+key=value, e.g. fedavg+pixdim=1.5)")
        key, raw = m.groups()
        if key in settings:
            raise ValueError(f"arm {arm!r} sets {key!r} twice")
        try:
            settings[key] = json.loads(raw)
        except json.JSONDecodeError:
            settings[key] = raw
    return base, settings


def job_algorithm(method: str) -> str:
    """The federated algorithm an arm's job runs (``fedavg_iid+x=1`` -> ``fedavg``)."""
    base = parse_arm(method)[0]
    return JOB_ALGORITHM.get(base, base)


def scored_model(method: str) -> str:
    """What a study scores on each site's test split for ``method`` (said in the report)."""
    method = parse_arm(method)[0]
    if method == "fedavg_iid":
        return ("the final global model of FedAvg trained on the same cases re-dealt so that every site holds the "
                "same mix of every site's cases (sizes per site unchanged)")
    if method == "pooled_steps":
        return ("one model trained on all sites' pooled training data for as many optimizer steps as FedAvg's global "
                "model takes (rounds x local epochs x the mean site's steps per epoch), after the last step")
    if method in FEDERATED:
        return registry.site_method_class(method).result
    if method == "local":
        return "the site's own model, trained alone, after the last epoch"
    if method == "pooled":
        return "one model trained on all sites' pooled training data, after the last epoch"
    return "the final global model"


@dataclass(frozen=True)
class TaskSpec:
    name: str
    job_script: str  # under jobs/
    bundle: str  # under bundles/
    metric: str  # the bundle's key validation metric
    metric_label: str
    methods: Tuple[str, ...]  # what this task supports


TASKS: Dict[str, TaskSpec] = {
    "prostate": TaskSpec("prostate", "prostate.py", "prostate_mri_seg", "val_mean_dice", "Dice", METHODS),
    # the same job and bundle as prostate, on phantom v2 (anatomy in mm, MR physics: fedharmony.phantom.prostate_mr)
    "prostate_v2": TaskSpec("prostate_v2", "prostate.py", "prostate_mri_seg", "val_mean_dice", "Dice", METHODS),
    "brain": TaskSpec("brain", "brain.py", "brain_mri_seg", "val_mean_dice", "Dice", METHODS),
    "dermoscopy": TaskSpec("dermoscopy", "dermoscopy.py", "image_classification", "val_macro_f1", "macro-F1",
                           METHODS),
    "histology": TaskSpec("histology", "histology.py", "image_classification", "val_macro_f1", "macro-F1",
                          METHODS),
}


@dataclass(frozen=True)
class Preset:
    """How big a study is. ``data`` holds the phantom generator's arguments for the training /
    validation draw; ``test_cases`` is the size of the separate test draw per site."""

    rounds: int
    local_epochs: int
    sites: Optional[int]  # None: every site of the task
    data: Dict[str, int] = field(default_factory=dict)
    test_cases: int = 0
    overrides: Dict[str, object] = field(default_factory=dict)
    threads_per_site: int = 1


# Sizes: see docs/studies.md ("Presets") for how they were chosen and what each takes here.
PRESETS: Dict[str, Dict[str, Preset]] = {
    "smoke": {
        "prostate": Preset(2, 1, 2, {"cases": 3, "size": 32, "slices": 8}, test_cases=4,
                           overrides={"samples_per_volume": 4, "batch_size": 1, "base_features": 4}),
        "prostate_v2": Preset(2, 1, 2, {"cases": 3, "voxel_scale": 8}, test_cases=3,
                              overrides={"samples_per_volume": 4, "batch_size": 1, "base_features": 4,
                                         "image_size": 32}),
        "brain": Preset(2, 1, 2, {"cases": 3, "voxel_scale": 8, "grid_mm": 4}, test_cases=3,
                        overrides={"samples_per_volume": 4, "batch_size": 1, "base_features": 4, "image_size": 32}),
        "dermoscopy": Preset(2, 1, 2, {"images_per_site": 36, "size": 32}, test_cases=40,
                             overrides={"image_size": 32, "base_features": 4, "batch_size": 8}),
        "histology": Preset(2, 1, 2, {"patients": 3, "patches_per_patient": 8, "size": 32}, test_cases=40,
                            overrides={"image_size": 32, "base_features": 4, "batch_size": 8}),
    },
    "standard": {
        "prostate": Preset(12, 2, None, {"cases": 10, "size": 96}, test_cases=50,
                           overrides={"image_size": 96, "samples_per_volume": 4}),
        # v1's size (10 cases a site, 96 px in-plane for the network), each site at its own scanner's matrix and
        # slices (256 to 560 px, 1.25 to 3.6 mm), 20 test cases a site
        "prostate_v2": Preset(12, 2, None, {"cases": 10}, test_cases=20,
                              overrides={"image_size": 96, "samples_per_volume": 4}),
        # the three sites' own case counts (16, 10, 6), voxels twice the profiles' (about 1.9 x 1.9 x 2.4 mm)
        "brain": Preset(12, 2, None, {"voxel_scale": 2}, test_cases=20,
                        overrides={"image_size": 96, "samples_per_volume": 4}),
        "dermoscopy": Preset(20, 2, None, {"images_per_site": 200, "size": 64}, test_cases=1000,
                             overrides={"image_size": 64}),
        "histology": Preset(20, 1, None, {"patches_per_hospital": 150, "size": 64}, test_cases=1000,
                            overrides={"image_size": 64}),
    },
    "paper": {
        "prostate": Preset(100, 1, None, {"size": 384}, test_cases=100, overrides={"image_size": 384}),
        "prostate_v2": Preset(100, 1, None, {}, test_cases=50, overrides={"image_size": 384}),
        "brain": Preset(100, 1, None, {}, test_cases=50, overrides={"image_size": 256}),
        "dermoscopy": Preset(100, 5, None, {"images_per_site": 1000, "size": 128}, test_cases=2000),
        "histology": Preset(100, 1, None, {"patches_per_hospital": 2000, "size": 96}, test_cases=2000),
    },
}


def preset_for(preset: str, task: str) -> Preset:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {sorted(TASKS)}")
    return PRESETS[preset][task]


def check_methods(task: str, methods) -> list:
    """The methods, in the order given, after checking that ``task`` supports each (raises ValueError)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {sorted(TASKS)}")
    methods = list(methods)
    bases = {m: parse_arm(m)[0] for m in methods}
    unknown = [m for m in methods if bases[m] not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {list(METHODS)} (an arm: METHOD+key=value)")
    unsupported = [m for m in methods if bases[m] not in TASKS[task].methods]
    if unsupported:
        raise ValueError(f"task {task!r} does not support {unsupported} (it supports {list(TASKS[task].methods)})")
    for m in methods:  # protocol=released: only the methods that have one (fedharmony.methods.protocols)
        protocol = parse_arm(m)[1].get("protocol")
        if protocol is not None:
            try:
                check_protocol(str(protocol), bases[m])
            except ValueError as e:
                raise ValueError(f"arm {m!r}: {e}") from None
    if len(set(methods)) != len(methods):
        raise ValueError(f"a method is listed twice: {methods}")
    if not methods:
        raise ValueError("no method given")
    return methods
