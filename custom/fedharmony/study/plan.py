"""A study's analysis plan: arms, comparisons, endpoints, seeds and margin, fixed before the first run
(no NVFlare import).

A study that tests a claim writes its plan first and commits it; the study tool then runs what
the plan says and nothing else, refuses to go on once the plan file has changed after its first
run, and the report computes exactly the plan's verdicts, with Holm's correction across all of
them. Everything else the report shows is marked *post hoc*.

The plan file (JSON)::

    {
      "plan": "fedharmony-study-plan/1",
      "name": "prostate_headroom",
      "question": "How much does scanner heterogeneity cost FedAvg on the prostate phantom?",
      "task": "prostate", "preset": "standard", "rounds": 12, "local_epochs": 2,
      "arms": ["fedavg", "fedavg_iid", "pooled_steps", "pooled"],
      "comparisons": [
        {"arm": "fedavg_iid", "baseline": "fedavg", "test": "superiority", "endpoints": ["mean", "worst"],
         "primary": true},
        {"arm": "fedbn", "baseline": "fedavg", "test": "noninferiority", "endpoints": ["mean", "sites"]}
      ],
      "alpha": 0.05,
      "margin": 0.01,
      "power": {"effect": 0.03, "sd": 0.025, "power": 0.8, "alpha": 0.0125, "sd_from": "where the SD was measured"},
      "seeds": 10
    }

An *outside study* (:mod:`fedharmony.study.outside`: a federation's model pool on sites outside it)
adds ``"outside": {"target": "unseen", "profiles": "docs/studies/unseen_scanners/set5.json",
"first_seed": 10, ...}`` (:class:`~fedharmony.study.outside.OutsideStudy`'s settings); its arms are
test-time methods (``global``, ``routing``, ``routing_safe (departure)``, ...), its sites the
outside targets, and it runs only the arms the plan names.

Endpoints: ``mean`` (the mean over sites, per seed), ``worst`` (the lowest site score, per seed)
and, for a non-inferiority comparison, ``sites`` (every site no worse by more than the margin: an
intersection-union test, so each site is tested at ``alpha`` and the claim needs all of them).
Tests: ``superiority`` (two-sided paired t-test over seeds; *better* / *worse* need the
Holm-adjusted p below ``alpha`` and both CIs of the difference excluding zero) and
``noninferiority`` (one-sided: the lower ``1 - alpha`` confidence bound of the difference above
``-margin``; the one-sided p of the same test joins the Holm family).

Seeds come from a power calculation: ``power`` gives the smallest effect of interest and the
per-seed standard deviation of a paired difference (say where it was measured), and optionally the
level it is computed at (``alpha``; default the plan's: a study with m verdicts may size its seeds
for Holm's strictest step, ``alpha / m``); the plan's
``seeds`` may be fewer than the calculation asks for (a machine's budget), and the report then
states the power those seeds have and the smallest effect they can detect.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

__all__ = ["PLAN_FORMAT", "ENDPOINTS", "TESTS", "PlanError", "Comparison", "Plan", "load_plan", "plan_commit"]

PLAN_FORMAT = "fedharmony-study-plan/1"
ENDPOINTS = ("mean", "worst", "sites")
TESTS = ("superiority", "noninferiority")
_KEYS = {"plan", "name", "question", "task", "preset", "rounds", "local_epochs", "arms", "comparisons", "alpha",
         "margin", "power", "seeds", "notes", "written", "outside", "pixel_scales", "data"}
# a plan's "data": the phantom generator's settings it may change from the preset's, per task
DATA_SETTINGS = {"prostate_v2": ("voxel_scale",), "brain": ("voxel_scale",)}


class PlanError(ValueError):
    """A plan that cannot be used; the message names the plan file and the field."""


@dataclass(frozen=True)
class Comparison:
    arm: str
    baseline: str
    test: str
    endpoints: Tuple[str, ...]
    primary: bool = False

    @property
    def label(self) -> str:
        return f"{self.arm} - {self.baseline}"


@dataclass(frozen=True)
class Plan:
    """A validated plan. ``digest`` is the sha256 of the file's bytes (what the lock and the report hold)."""

    name: str
    question: str
    task: str
    preset: str
    rounds: Optional[int]
    local_epochs: Optional[int]
    arms: Tuple[str, ...]
    comparisons: Tuple[Comparison, ...]
    alpha: float
    margin: Optional[float]
    power: dict
    seeds: int
    digest: str
    raw: dict
    outside: Optional[dict] = None  # an outside study's settings (fedharmony.study.outside.OutsideStudy's keywords)

    def power_summary(self) -> dict:
        """The power calculation: seeds needed, power at the plan's seeds, smallest detectable effect."""
        from fedharmony.study.stats import detectable_effect, paired_t_power, seeds_for_power

        p = self.power
        alpha = float(p.get("alpha", self.alpha))  # the calculation's level (Holm's strictest step: alpha / m)
        return {"effect": p["effect"], "sd": p["sd"], "target_power": p["power"], "alpha": alpha,
                "seeds_needed": seeds_for_power(p["effect"], p["sd"], p["power"], alpha),
                "seeds": self.seeds, "power_at_seeds": paired_t_power(p["effect"], p["sd"], self.seeds, alpha),
                "detectable_effect": detectable_effect(p["sd"], self.seeds, p["power"], alpha),
                "sd_from": p.get("sd_from", "")}


def _number(raw: dict, key: str, where: str, low: float, high: float, integer: bool = False, required=True):
    value = raw.get(key)
    if value is None and not required:
        return None
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok or not low <= value <= high:
        kind = "an integer" if integer else "a number"
        raise PlanError(f"{where}: {key!r} must be {kind} in [{low}, {high}], got {value!r}")
    return value


def load_plan(path) -> Plan:
    """Read and check a plan file; every refusal names the file and the field.

    Raises:
        PlanError: not a plan, an unknown field, an arm the task does not support, a comparison of
            arms the plan does not run, an unknown endpoint or test, a non-inferiority comparison
            without a margin, a power calculation that cannot be computed.
    """
    from fedharmony.study.stats import seeds_for_power
    from fedharmony.study.tasks import PRESETS, check_methods

    path = Path(path)
    where = f"plan {path}"
    try:
        data = path.read_bytes()
        raw = json.loads(data)
    except OSError as e:
        raise PlanError(f"{where}: cannot be read ({e})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PlanError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(raw, dict) or raw.get("plan") != PLAN_FORMAT:
        raise PlanError(f"{where}: not a study plan (needs \"plan\": {PLAN_FORMAT!r})")
    unknown = sorted(set(raw) - _KEYS)
    if unknown:
        raise PlanError(f"{where}: unknown fields {unknown} (known: {sorted(_KEYS)})")
    for key in ("name", "question", "task"):
        if not isinstance(raw.get(key), str) or not raw[key].strip():
            raise PlanError(f"{where}: {key!r} must be a non-empty string")
    preset = raw.get("preset", "standard")
    if preset not in PRESETS:
        raise PlanError(f"{where}: unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    arms = raw.get("arms")
    if not isinstance(arms, list) or not all(isinstance(a, str) for a in arms):
        raise PlanError(f"{where}: 'arms' must be a list of arm names")
    outside = raw.get("outside")
    try:
        if outside is not None:  # arms are test-time methods on sites outside a federation
            from fedharmony.study.outside_arms import check_outside_plan

            arms = tuple(check_outside_plan(raw["task"], outside, arms))
        else:
            arms = tuple(check_methods(raw["task"], arms))
    except ValueError as e:
        field = "outside" if outside is not None else "arms"
        raise PlanError(f"{where}: {field!r}: {e}") from None
    scales = None
    if raw.get("pixel_scales") is not None:
        from fedharmony.study.robustness import check_pixel_scales

        if not isinstance(raw["pixel_scales"], list):
            raise PlanError(f"{where}: 'pixel_scales' must be a list of factors, got {raw['pixel_scales']!r}")
        try:
            scales = check_pixel_scales(raw["pixel_scales"])
        except ValueError as e:
            raise PlanError(f"{where}: 'pixel_scales': {e}") from None
    if raw.get("data") is not None:  # the phantom data's size, where the preset's is too costly for the question
        allowed = DATA_SETTINGS.get(raw["task"], ())
        if not isinstance(raw["data"], dict) or not raw["data"] or set(raw["data"]) - set(allowed):
            raise PlanError(f"{where}: 'data' may set {list(allowed) or 'nothing'} for task {raw['task']!r}, got "
                            f"{raw['data']!r}")
        _number(raw["data"], "voxel_scale", f"{where}: 'data'", 1, 16)
    known = set(ENDPOINTS) | {f"{e}@{f:g}" for e in ("mean", "worst") for f in scales or ()}
    alpha = _number(raw, "alpha", where, 1e-6, 0.5) if "alpha" in raw else 0.05
    margin = _number(raw, "margin", where, 1e-9, 1.0, required=False)
    comparisons = []
    if not isinstance(raw.get("comparisons"), list) or not raw["comparisons"]:
        raise PlanError(f"{where}: 'comparisons' must list at least one comparison")
    for i, c in enumerate(raw["comparisons"]):
        cw = f"{where}: comparisons[{i}]"
        if not isinstance(c, dict) or not {"arm", "baseline", "test", "endpoints"} <= set(c) \
                or set(c) - {"arm", "baseline", "test", "endpoints", "primary"}:
            raise PlanError(f"{cw} needs exactly arm, baseline, test, endpoints (and optionally primary)")
        for key in ("arm", "baseline"):
            if c[key] not in arms:
                raise PlanError(f"{cw}: {key} {c[key]!r} is not one of the plan's arms {list(arms)}")
        if c["arm"] == c["baseline"]:
            raise PlanError(f"{cw}: compares {c['arm']!r} with itself")
        if c["test"] not in TESTS:
            raise PlanError(f"{cw}: test {c['test']!r} is not one of {list(TESTS)}")
        endpoints = c["endpoints"]
        if not isinstance(endpoints, list) or not endpoints or any(e not in known for e in endpoints) \
                or len(set(endpoints)) != len(endpoints):
            raise PlanError(f"{cw}: endpoints must be distinct entries of {list(ENDPOINTS)} (or mean@F, worst@F "
                            f"for a factor F of the plan's pixel_scales), got {endpoints!r}")
        if "sites" in endpoints and c["test"] != "noninferiority":
            raise PlanError(f"{cw}: the 'sites' endpoint is a non-inferiority claim (every site no worse)")
        if c["test"] == "noninferiority" and margin is None:
            raise PlanError(f"{cw}: a non-inferiority comparison needs the plan's 'margin'")
        comparisons.append(Comparison(c["arm"], c["baseline"], c["test"], tuple(endpoints), bool(c.get("primary"))))
    labels = [(c.arm, c.baseline, c.test) for c in comparisons]
    if len(set(labels)) != len(labels):
        raise PlanError(f"{where}: a comparison is listed twice")
    power = raw.get("power")
    if not isinstance(power, dict) or not {"effect", "sd", "power"} <= set(power):
        raise PlanError(f"{where}: 'power' must give the smallest effect of interest ('effect'), the per-seed SD "
                        f"of a paired difference ('sd') and the target 'power'")
    unknown = sorted(set(power) - {"effect", "sd", "power", "alpha", "sd_from"})
    if unknown:
        raise PlanError(f"{where}: 'power' has unknown field(s) {unknown}")
    power_alpha = _number(power, "alpha", f"{where}: 'power'", 1e-9, 0.5, required=False) or alpha
    try:
        needed = seeds_for_power(float(power["effect"]), float(power["sd"]), float(power["power"]), power_alpha)
    except (TypeError, ValueError) as e:
        raise PlanError(f"{where}: 'power': {e}") from None
    seeds = _number(raw, "seeds", where, 2, 1000, integer=True, required=False) or needed
    rounds = _number(raw, "rounds", where, 1, 100000, integer=True, required=False)
    local_epochs = _number(raw, "local_epochs", where, 1, 100000, integer=True, required=False)
    return Plan(raw["name"], raw["question"], raw["task"], preset, rounds, local_epochs, arms, tuple(comparisons),
                float(alpha), None if margin is None else float(margin), dict(power), int(seeds),
                "sha256:" + hashlib.sha256(data).hexdigest(), raw, dict(outside) if outside is not None else None)


def plan_commit(path) -> Tuple[Optional[str], str]:
    """``(commit, why)``: the last commit of the plan file when it is committed and unchanged, else None and why.

    The study tool refuses to start a planned study whose plan file lies in a git checkout but is not
    committed as it is (a plan is written and committed before the first run).
    """
    path = Path(path).resolve()

    def git(*args):
        return subprocess.run(["git", "-C", str(path.parent), *args], capture_output=True, text=True)

    top = git("rev-parse", "--show-toplevel")
    if top.returncode != 0:
        return None, "outside a git checkout"
    if git("ls-files", "--error-unmatch", path.name).returncode != 0:
        return None, "not committed"
    if git("diff", "--quiet", "HEAD", "--", path.name).returncode != 0:
        return None, "changed since its last commit"
    commit = git("log", "-1", "--format=%H", "--", path.name).stdout.strip()
    return (commit or None), ("committed" if commit else "not committed")
