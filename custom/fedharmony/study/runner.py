"""Run a study: every (method, seed) once, cached, resumable, with progress (no NVFlare import).

Each federated (method, seed) is the task's real job script (``jobs/<task>.py``) in the NVFlare
simulator, in its own process, its output in ``<out>/runs/<method>/seed<k>/log.txt``. The
``local`` and ``pooled`` references run ``python -m fedharmony.study.centralized`` the same way.
After a run the study scores the model each site would use (:func:`fedharmony.study.tasks.scored_model`)
on that site's test split and writes ``result.json`` beside the log (atomically). A run
whose ``result.json`` is complete and was made with the same settings is not run again; one
that is unreadable or incomplete is named and run again. The settings include the bundle's
configs but not the package's code, so each run also records what it was made on
(:mod:`fedharmony.study.provenance`): a cached run made on other code is named when reused, and
the report lists what every arm's runs were made on.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

from fedharmony.core.results import RETROGRESS_SUFFIXES
from fedharmony.data.datalist import smallest_split
from fedharmony.methods.protocols import check_protocol, needs_smallest_site, protocol_overrides
from fedharmony.study.data import StudyData, iid_dataset, make_phantom_data, real_data
from fedharmony.study.plan import Plan, PlanError, plan_commit
from fedharmony.study.provenance import bundle_record, code_digest, cpu_description, describe, made_on
from fedharmony.study.robustness import check_pixel_scales, resampled_test_root, score_pixel_scales
from fedharmony.study.scoring import load_weights, score_on_site
from fedharmony.methods import site_method_class
from fedharmony.study.tasks import (CENTRALIZED, FEDERATED, PERSONALIZED, TASKS, Preset, check_methods, job_algorithm,
                                   parse_arm, preset_for, scored_model)

__all__ = ["Study", "RESULT_FILE", "RESULTS_FILE", "PLAN_LOCK", "lock_plan", "plan_results", "read_cache_entry", "validate_result", "training_configs_digest"]

RESULT_FILE = "result.json"
RESULTS_FILE = "results.json"
PLAN_LOCK = "plan.lock.json"  # a planned study's record of the plan it started with (digest, commit, first run)
REPO = Path(__file__).resolve().parents[3]


def _atomic_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=False) + "\n")
    os.replace(tmp, path)


def read_cache_entry(path: Path, echo: Callable[[str], None]):
    """A cached run's ``result.json``, or None: absent, or unreadable (said through ``echo``: it runs again)."""
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        echo(f"cache entry {path} is corrupt ({type(e).__name__}): running it again")
        return None


def validate_result(entry, settings_key: str, sites) -> Optional[str]:
    """Why a cached run result cannot be used (None: it can)."""
    if not isinstance(entry, dict):
        return "not a JSON object"
    if entry.get("settings_key") != settings_key:
        return "made with other settings"
    scores = entry.get("site_scores")
    if not isinstance(scores, dict) or sorted(scores) != sorted(sites):
        return f"site scores for {sorted(scores) if isinstance(scores, dict) else scores!r}, expected {sorted(sites)}"
    bad = [s for s, v in scores.items() if not isinstance(v, (int, float)) or not math.isfinite(v)]
    if bad:
        return f"no finite score for {bad}"
    return None


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def training_configs_digest(bundle_dir) -> str:
    """``sha256:<hex>`` of the configs a study run reads: ``configs/train.json`` (training, validation and the
    test evaluator that scores it) and every method's overlay, by name and content. Inference configs, the
    metadata and the tunables list are left out: a study never reads them, so a change there (a new output
    format, a version bump) does not make the cached runs stale."""
    from fedharmony.methods import METHODS

    configs = Path(bundle_dir) / "configs"
    names = {"train.json"} | {Path(site_method_class(m).overlay).name for m in METHODS if site_method_class(m).overlay}
    h = hashlib.sha256()
    for name in sorted(names):
        path = configs / name
        if path.is_file():
            h.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    return "sha256:" + h.hexdigest()


STALL_S = 900.0  # a run whose log has not grown for this long is stuck (a round here logs every few seconds)


class RunStalled(RuntimeError):
    """A run's process wrote nothing for ``stall_s`` seconds and was stopped."""


def run_watched(cmd, log, env: dict, stall_s: float, poll_s: float = 5.0) -> None:
    """Run ``cmd`` with its output into ``log``; stop its whole process group if ``log`` stops growing for
    ``stall_s`` seconds (raises :class:`RunStalled`), raise RuntimeError on a non-zero exit status.

    The NVFlare simulator waits for every site's answer with no deadline, so a site process that dies before
    its first log line (seen here under load: "Connection reset by peer" at the first task) hangs the job.
    """
    import signal

    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(REPO), start_new_session=True)
    size, last_change = -1, time.time()
    while proc.poll() is None:
        time.sleep(poll_s)
        now_size = os.path.getsize(log.name)
        if now_size != size:
            size, last_change = now_size, time.time()
        elif time.time() - last_change > stall_s:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise RunStalled(f"no output for {stall_s:.0f} s: stopped (see {log.name})")
    if proc.returncode != 0:
        raise RuntimeError(f"exit status {proc.returncode}; see {log.name}")


def once_more_if_stalled(attempt, tell):
    """``attempt()``, and once more if it raised :class:`RunStalled` (``tell`` gets the reason first); a second
    stall, or any other error, propagates. The one rule for every watched run: a stall is the simulator
    waiting for a site that died at start, which a fresh start usually avoids; a failure is not retried."""
    try:
        return attempt()
    except RunStalled as e:
        tell(f"{e}; running it once more")
        return attempt()


def lock_plan(plan: Plan, plan_path: Path, out: Path) -> dict:
    """Check ``plan`` against the one the study in ``out`` started with (``plan.lock.json``), or record it there
    at the first run: its digest, its commit and the time. The same rule for every study the tool runs.

    Raises:
        PlanError: the plan file changed after the study's first run; the folder already holds runs
            made without this plan; or the plan lies in a git checkout but is not committed as it is.
    """
    lock = Path(out) / PLAN_LOCK
    if lock.is_file():
        try:
            recorded = json.loads(lock.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise PlanError(f"{lock} is unreadable ({type(e).__name__}); it records the plan this study started "
                            "with and cannot be rebuilt") from None
        if recorded.get("digest") != plan.digest:
            raise PlanError(f"study {out} started on {recorded.get('first_run')} with plan digest "
                            f"{recorded.get('digest')}; {plan_path} now has {plan.digest}. A plan is fixed "
                            "before the first run: restore it, or write a new plan for a new study folder")
        return recorded
    if any((Path(out) / "runs").glob(f"*/*/{RESULT_FILE}")):
        raise PlanError(f"study {out} already holds runs made without plan {Path(plan_path).name}: a planned "
                        "study starts in a folder of its own")
    commit, state = plan_commit(plan_path)
    if commit is None and state != "outside a git checkout":
        raise PlanError(f"plan {plan_path} is {state}: commit it before the study's first run, so the "
                        "record shows the plan was fixed first")
    try:
        shown = str(Path(plan_path).relative_to(REPO))
    except ValueError:
        shown = str(plan_path)
    record = {"name": plan.name, "file": shown, "digest": plan.digest, "commit": commit, "commit_state": state,
              "first_run": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    _atomic_json(lock, record)
    return record


def plan_results(plan: Optional[Plan], record: Optional[dict], plan_path, out: Path) -> dict:
    """What a study's ``results.json`` holds of its plan: the lock's record (``record``, or read from ``out``),
    the plan's content and its power; nothing without a plan."""
    if plan is None:
        return {}
    if record is None and (Path(out) / PLAN_LOCK).is_file():
        record = lock_plan(plan, plan_path, out)
    record = record or {"name": plan.name, "digest": plan.digest, "first_run": "not started"}
    return {"plan": {**record, "content": plan.raw, "power": plan.power_summary()}}


class Study:
    """One task, several methods and seeds.

    Args:
        task: ``prostate``, ``dermoscopy`` or ``histology``.
        methods: federated methods and/or ``local`` / ``pooled``.
        seeds: number of seeds (0 .. seeds - 1); seed k draws the phantom data with seed k and
            sets the bundle's ``seed`` to k.
        preset: ``smoke``, ``standard`` or ``paper``.
        out: study folder (``results.json``, ``report.md``, ``runs/``, ``data/``).
        test_cases: test draw size per site (default: the preset's).
        data_root: prepared real data (site folders + ``sites.json``) instead of phantom sites.
        rounds, local_epochs: change the preset's.
        keep_workspaces: keep each run's simulator workspace (default: only logs and results).
        echo: where progress lines go.
        retrogress: every federated run also scores each site's model after local training, and the
            network that takes the server's answer where the site uses another (PRR-FL's deputy), so the
            report can show what a communication costs (the retrogress of PRR-FL's paper). A setting of
            the runs: the cache of a study without it is not reused.
        pixel_scales: score each run's models also on the test scans resampled in-plane to these factors times
            their pixel size (:mod:`fedharmony.study.robustness`; 1 is added: the scans as stored). A setting of
            the runs: the cache of a study without it is not reused.
        analysis_plan, plan_path: the study's analysis plan (:mod:`fedharmony.study.plan`) and its file;
            use :meth:`from_plan`, which takes the task, arms, seeds and sizes from the plan. The first run
            locks the plan (``plan.lock.json``: digest, commit, time); a later start with a changed plan
            file is refused.
    """

    @classmethod
    def from_plan(cls, plan_path, out=None, **kwargs) -> "Study":
        """The study a plan file describes, in ``out`` (default: the plan file's folder).

        Raises:
            PlanError: the plan cannot be used (see :func:`fedharmony.study.plan.load_plan`).
        """
        from fedharmony.study.plan import load_plan

        plan = load_plan(plan_path)
        if plan.raw.get("pixel_scales") is not None:
            kwargs.setdefault("pixel_scales", plan.raw["pixel_scales"])
        if plan.raw.get("data") is not None:
            kwargs.setdefault("data", plan.raw["data"])
        return cls(plan.task, list(plan.arms), plan.seeds, plan.preset, out or Path(plan_path).resolve().parent,
                   rounds=plan.rounds, local_epochs=plan.local_epochs, analysis_plan=plan, plan_path=plan_path,
                   **kwargs)

    def __init__(self, task: str, methods, seeds: int, preset: str, out, test_cases: Optional[int] = None,
                 data_root: Optional[str] = None, rounds: Optional[int] = None, local_epochs: Optional[int] = None,
                 keep_workspaces: bool = False, echo: Callable[[str], None] = print, command: str = "",
                 stall_s: float = STALL_S, retrogress: bool = False, analysis_plan: Optional[Plan] = None,
                 plan_path=None, pixel_scales=None, data: Optional[dict] = None):
        self.spec = TASKS.get(task)
        self.methods = check_methods(task, methods)
        if seeds < 1:
            raise ValueError(f"seeds must be >= 1, got {seeds}")
        base = preset_for(preset, task)
        self.preset_name = preset
        self.preset = Preset(rounds=rounds or base.rounds, local_epochs=local_epochs or base.local_epochs,
                             sites=base.sites, data={**base.data, **(data or {})},
                             test_cases=test_cases or base.test_cases,
                             overrides=dict(base.overrides), threads_per_site=base.threads_per_site)
        if self.preset.rounds < 1 or self.preset.local_epochs < 1 or self.preset.test_cases < 1:
            raise ValueError("rounds, local_epochs and test_cases must be >= 1")
        self.task = task
        self.seeds = list(range(seeds))
        self.out = Path(out).resolve()
        self.data_root = str(Path(data_root).resolve()) if data_root else None
        if self.data_root:
            real_data(self.data_root)  # refuse a folder that is not prepared data before anything runs
        self.keep_workspaces = keep_workspaces
        self.retrogress = bool(retrogress)
        self.pixel_scales = check_pixel_scales(pixel_scales)
        if stall_s <= 0:
            raise ValueError(f"stall_s must be > 0, got {stall_s}")
        self.stall_s = float(stall_s)
        self.echo = echo
        self.command = command
        self.bundle_dir = REPO / "bundles" / self.spec.bundle
        self._scales: Dict[tuple, object] = {}  # federated settings per seed: histogram scales, fingerprints
        self._code: Optional[str] = None  # this checkout's code digest, read when a cached run is met
        self.analysis_plan = analysis_plan
        self.plan_path = Path(plan_path).resolve() if plan_path else None
        if analysis_plan is not None and self.plan_path is None:
            raise ValueError("a study with an analysis plan needs the plan's file (plan_path)")
        self._plan_record: Optional[dict] = None

    # ------------------------------------------------------------------ the plan
    def lock_plan(self) -> Optional[dict]:
        """Check the plan against the one this study started with, or record it at the first run
        (:func:`lock_plan`)."""
        if self.analysis_plan is None:
            return None
        self._plan_record = lock_plan(self.analysis_plan, self.plan_path, self.out)
        return self._plan_record

    def _plan_results(self) -> dict:
        """What ``results.json`` holds of the plan: the lock's record, the plan's content and its power."""
        return plan_results(self.analysis_plan, self._plan_record, self.plan_path, self.out)

    # ------------------------------------------------------------------ settings
    def settings(self) -> dict:
        """Everything a run's result depends on, the bundle's training configs included (a changed training
        config makes every cached run stale; an inference config, which no run reads, does not)."""
        p = self.preset
        return {"task": self.task, "preset": self.preset_name, "rounds": p.rounds, "local_epochs": p.local_epochs,
                "sites": p.sites, "data": p.data, "test_cases": None if self.data_root else p.test_cases,
                "overrides": p.overrides, "data_root": self.data_root, "threads_per_site": p.threads_per_site,
                "bundle": self.spec.bundle, "training_configs_digest": training_configs_digest(self.bundle_dir),
                **({"retrogress": True} if self.retrogress else {}),  # absent when off: older caches stay valid
                **({"pixel_scales": list(self.pixel_scales)} if self.pixel_scales else {})}

    def settings_key(self, method: str, seed: int) -> str:
        blob = json.dumps({**self.settings(), "method": method, "seed": seed}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def run_dir(self, method: str, seed: int) -> Path:
        return self.out / "runs" / method / f"seed{seed}"

    def overrides(self, seed: int, method: str = "") -> dict:
        """The bundle overrides of a run: the task's, the preset's, the arm's own settings, the seed."""
        extra = {"task": self.task} if self.spec.bundle == "image_classification" else {}
        base, settings = parse_arm(method)
        if settings.get("histogram_scale") == "federated":
            settings["histogram_scale"] = self.federated_histogram_scale(seed, bool(settings.get("bias_correction")))
        if settings.get("pixdim") == "fingerprint":  # spacing and crop from the sites' fingerprints
            cap = settings.get("image_size", self.preset.overrides.get("image_size"))
            settings.update(self.fingerprint_settings(seed, cap if isinstance(cap, int) and cap > 0 else None))
        protocol = settings.pop("protocol", "paper")  # a job flag, expanded here into its bundle settings
        overrides = {**extra, **self.preset.overrides, **settings, "seed": seed}
        smallest = None
        if check_protocol(protocol, base) == "released" and needs_smallest_site(base):
            data = self.data(seed)
            smallest = smallest_split(data.train_root, num_sites=len(data.sites))[0]
        return protocol_overrides(base, protocol, overrides, smallest)

    def fingerprint_settings(self, seed: int, max_image_size: Optional[int] = None) -> dict:
        """The arm setting ``pixdim=fingerprint``: the ``pixdim`` and ``image_size`` the seed's sites agree on from
        their training scans' header fingerprints (what ``tools/fingerprint.py`` does across real sites), the
        crop at most ``max_image_size`` (the preset's or the arm's ``image_size``). Said on the terminal once."""
        from fedharmony.data.fingerprint import combine_fingerprints, site_fingerprint

        key = ("fingerprint", seed, max_image_size)
        if key not in self._scales:
            data = self.data(seed)
            folders = list(data.sites.values())
            choice = combine_fingerprints([site_fingerprint(data.train_root / f) for f in folders], folders,
                                          max_image_size)
            for line in choice["why"] + [f"unlike the rest: {o}" for o in choice["outliers"]]:
                self.echo(f"  fingerprint, seed {seed}: {line}")
            self._scales[key] = choice["settings"]
        return dict(self._scales[key])

    def federated_histogram_scale(self, seed: int, bias_correction: bool = False) -> str:
        """The arm setting ``histogram_scale=federated``: the scale the seed's sites agree on from their training
        volumes' landmark summaries (what ``tools/histogram_landmarks.py`` does across real sites)."""
        from fedharmony.bundle.classical_harmonization import dataset_landmarks, format_scale, standard_scale

        key = (seed, bias_correction)
        if key not in self._scales:
            data = self.data(seed)
            summaries = [dataset_landmarks(data.train_root / folder, "training", bias_correction)
                         for folder in data.sites.values()]
            self._scales[key] = format_scale(standard_scale(summaries))
        return self._scales[key]

    def pixel_scale_roots(self, seed: int, data: StudyData) -> Dict[str, str]:
        """Factor (as text) -> the seed's test draw resampled to it (written once), for every pixel scale but 1."""
        return {f"{f:g}": str(resampled_test_root(data.test_root, data.sites, f,
                                                  self.out / "data" / f"seed{seed}" / f"test_px{f:g}"))
                for f in self.pixel_scales or () if f != 1.0}

    def config_files(self, method: str) -> List[str]:
        method = job_algorithm(method)
        overlay = site_method_class(method).overlay if method in FEDERATED else None
        return ["configs/train.json"] + ([overlay] if overlay else [])

    def data(self, seed: int) -> StudyData:
        if self.data_root:
            return real_data(self.data_root)
        return make_phantom_data(self.task, self.out / "data" / f"seed{seed}", seed, self.preset.sites,
                                 self.preset.data, self.preset.test_cases)

    # ------------------------------------------------------------------ cache
    def cached(self, method: str, seed: int, sites) -> Optional[dict]:
        path = self.run_dir(method, seed) / RESULT_FILE
        entry = read_cache_entry(path, self.echo)
        if entry is None:
            return None
        why = validate_result(entry, self.settings_key(method, seed), sites)
        if why:
            self.echo(f"cache entry {path} cannot be used ({why}): running it again")
            return None
        return entry

    # ------------------------------------------------------------------ one run
    def _run_federated(self, method: str, seed: int, data: StudyData, run_dir: Path, log) -> dict:
        ws_root = run_dir / "workspace"
        shutil.rmtree(ws_root, ignore_errors=True)
        arm, method = method, job_algorithm(method)
        if parse_arm(arm)[0] == "fedavg_iid":  # the heterogeneity control: FedAvg on the cases re-dealt
            data = iid_dataset(data, self.out / "data" / f"seed{seed}" / "iid", seed)
        name = f"{self.task}_{method}_seed{seed}"
        cmd = [sys.executable, str(REPO / "jobs" / self.spec.job_script), "--algorithm", method,
               "--rounds", str(self.preset.rounds), "--local-epochs", str(self.preset.local_epochs),
               "--sites", str(len(data.sites)), "--data-root", str(data.train_root), "--workspace", str(ws_root),
               "--name", name, "--override", json.dumps(self.overrides(seed, arm)),
               "--protocol", str(parse_arm(arm)[1].get("protocol", "paper")),
               "--torch-threads", str(self.preset.threads_per_site), "--verbose"]  # the full log into log.txt
        # cross-site evaluation only where the server collects site models that way (IOP-FL's pool); the
        # study scores the models itself, on the larger test draw
        site_cls = site_method_class(method)
        cmd += ["--cross-site-timeout", "300"] if site_cls.needs_cross_site_eval else ["--no-cross-site-eval"]
        cmd += ["--score-after-training"] if self.retrogress else []
        self._subprocess(cmd, log)
        ws = ws_root / name
        result_tag = self.spec.metric + site_cls.result_tag
        suffixes = RETROGRESS_SUFFIXES if self.retrogress else ()
        curves = _curves(ws, [result_tag, *(self.spec.metric + suffix for suffix in suffixes)])
        curve = curves[result_tag]
        # suffix -> site -> round -> score ("": the model the site uses, at round start)
        retrogress = {suffix: {data.sites.get(k, k): v for k, v in curves[self.spec.metric + suffix].items()}
                      for suffix in suffixes if curves[self.spec.metric + suffix]}
        site_results, weights = {}, {}
        for client, folder in data.sites.items():
            if method in PERSONALIZED:
                found = sorted(ws.rglob(f"fedharmony/{client}/best_model.pt"))
            else:
                found = sorted(ws.rglob("app_server/FL_global_model.pt"))
            if not found:
                raise FileNotFoundError(f"{method} seed {seed}: no model to score for {client} in {ws}")
            weights[folder] = load_weights(found[0])
            site_results[folder] = score_on_site(self.bundle_dir, data.test_root / folder, weights[folder],
                                                 self.spec.metric, self.config_files(method), self.overrides(seed, arm))
        site_scores = {s: r["score"] for s, r in site_results.items()}
        extra = {}
        if self.pixel_scales:  # the same models on the test scans at other pixel sizes
            scored = score_pixel_scales(
                lambda root, folder: score_on_site(self.bundle_dir, root / folder, weights[folder], self.spec.metric,
                                                   self.config_files(method), self.overrides(seed, arm))["score"],
                {k: Path(v) for k, v in self.pixel_scale_roots(seed, data).items()}, list(weights))
            extra["pixel_scale_scores"] = {"1": site_scores, **scored}
        curve = {data.sites.get(k, k): v for k, v in curve.items()}
        if not self.keep_workspaces:
            _keep_logs_only(ws_root)
        return {"site_scores": site_scores, "site_results": site_results,
                "curve": curve, **({"retrogress_curves": retrogress} if self.retrogress else {}), **extra}

    def _run_reference(self, method: str, seed: int, data: StudyData, run_dir: Path, log) -> dict:
        spec = {"mode": parse_arm(method)[0], "bundle_dir": str(self.bundle_dir), "config_files": self.config_files(method),
                "overrides": self.overrides(seed, method), "data": dict(data), "out_dir": str(run_dir / "workspace"),
                "rounds": self.preset.rounds, "local_epochs": self.preset.local_epochs, "metric": self.spec.metric,
                "threads": self.preset.threads_per_site,
                **({"pixel_scale_roots": self.pixel_scale_roots(seed, data)} if self.pixel_scales else {})}
        spec_path, out_path = run_dir / "reference_spec.json", run_dir / "reference_result.json"
        _atomic_json(spec_path, spec)
        self._subprocess([sys.executable, "-m", "fedharmony.study.centralized", str(spec_path), str(out_path)], log)
        result = json.loads(out_path.read_text())
        if not self.keep_workspaces:
            shutil.rmtree(run_dir / "workspace", ignore_errors=True)
        return result

    def _subprocess(self, cmd, log) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": str(self.preset.threads_per_site), "PYTHONHASHSEED": "0"}
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        run_watched(cmd, log, env, self.stall_s)

    def run_one(self, method: str, seed: int) -> dict:
        data = self.data(seed)
        run_dir = self.run_dir(method, seed)
        run_dir.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        made = made_on()  # before the run: the code it starts with, even if edited while it runs
        with open(run_dir / "log.txt", "w") as log:
            if parse_arm(method)[0] in CENTRALIZED:
                result = self._run_reference(method, seed, data, run_dir, log)
            else:
                result = self._run_federated(method, seed, data, run_dir, log)
        entry = {"method": method, "seed": seed, "scored_model": scored_model(method), **result,
                 "wall_s": time.time() - t0, "settings_key": self.settings_key(method, seed), "made_on": made}
        _atomic_json(run_dir / RESULT_FILE, entry)
        return entry

    # ------------------------------------------------------------------ the study
    def plan(self) -> list:
        """Every (method, seed), seed by seed, so an interrupted study has whole seeds to compare."""
        return [(m, s) for s in self.seeds for m in self.methods]

    def collect(self) -> dict:
        """``results.json`` from the cached runs alone (nothing runs; the others are listed as pending)."""
        runs, pending = [], []
        for method, seed in self.plan():
            sites = self._sites_without_drawing(seed)
            entry = self.cached(method, seed, sites) if sites is not None else None
            if entry is not None:
                runs.append(entry)
            else:
                pending.append({"method": method, "seed": seed})
        results = self.results(runs, [], 0.0, pending)
        _atomic_json(self.out / RESULTS_FILE, results)
        return results

    def _made_elsewhere(self, entry: dict) -> str:
        """What to add to "cached" when the cached run was not made on this code (the cache keys settings, not
        code: the report lists what each arm's runs were made on)."""
        if self._code is None:
            self._code = code_digest()
        info = entry.get("made_on")
        if not isinstance(info, dict):
            return f" (made on code it does not record: {describe(info)})"
        return "" if info.get("code") == self._code else f" (made on other code: {describe(info)})"

    def _sites_without_drawing(self, seed: int) -> Optional[list]:
        """The site folders of seed ``seed``'s data if it exists (None: not drawn yet)."""
        if self.data_root:
            return list(real_data(self.data_root).sites.values())
        marker = self.out / "data" / f"seed{seed}" / "study_data.json"
        try:
            return list(json.loads(marker.read_text())["data"]["sites"].values())
        except (OSError, json.JSONDecodeError, KeyError, TypeError):
            return None

    def run(self) -> dict:
        t_study = time.time()
        self.lock_plan()
        plan = self.plan()
        runs, fresh_times, cached_times, failed = [], [], [], []
        self.echo(f"study: {self.task}, preset {self.preset_name}, {len(self.methods)} method(s) x "
                  f"{len(self.seeds)} seed(s) = {len(plan)} runs, out {self.out}")
        for i, (method, seed) in enumerate(plan, start=1):
            data = self.data(seed)
            entry = self.cached(method, seed, list(data.sites.values()))
            if entry is not None:
                self.echo(f"[{i}/{len(plan)}] {method} seed {seed}: cached{self._made_elsewhere(entry)}")
                runs.append(entry)
                if isinstance(entry.get("wall_s"), (int, float)) and entry["wall_s"] > 0:
                    cached_times.append(float(entry["wall_s"]))
                continue
            left = len(plan) - i + 1
            # this invocation's runs say most about the machine as it is now; a resumed study's first run
            # estimates from the cached runs' own times
            times = fresh_times or cached_times
            eta = f", about {_duration(left * sum(times) / len(times))} left" if times else ""
            self.echo(f"[{i}/{len(plan)}] {method} seed {seed}: running{eta} (log {self.run_dir(method, seed)}/log.txt)")
            t0 = time.time()
            try:
                entry = once_more_if_stalled(lambda: self.run_one(method, seed),
                                             lambda why: self.echo(f"[{i}/{len(plan)}] {method} seed {seed}: {why}"))
            except Exception as e:  # one failed run must not lose the others: report it, go on
                failed.append({"method": method, "seed": seed, "error": f"{type(e).__name__}: {e}"})
                self.echo(f"[{i}/{len(plan)}] {method} seed {seed}: FAILED ({type(e).__name__}: {e})")
                continue
            fresh_times.append(time.time() - t0)
            mean = sum(entry["site_scores"].values()) / len(entry["site_scores"])
            self.echo(f"[{i}/{len(plan)}] {method} seed {seed}: done in {_duration(fresh_times[-1])}, "
                      f"mean {self.spec.metric_label} {mean:.3f}")
            runs.append(entry)
            # results.json after every run: an interrupted study loses nothing and can be reported on
            pending = [{"method": m, "seed": s} for m, s in plan[i:]]
            _atomic_json(self.out / RESULTS_FILE, self.results(runs, failed, time.time() - t_study, pending))
        results = self.results(runs, failed, time.time() - t_study)
        _atomic_json(self.out / RESULTS_FILE, results)
        return results

    def results(self, runs, failed, wall_s, pending=()) -> dict:
        import monai
        import nvflare
        import torch

        return {
            "task": self.task, "metric": self.spec.metric, "metric_label": self.spec.metric_label,
            "methods": self.methods, "seeds": self.seeds, "settings": self.settings(),
            "scored_models": {m: scored_model(m) for m in self.methods},
            "runs": [{k: v for k, v in r.items() if k != "settings_key"} for r in runs], "failed": failed,
            "pending": list(pending),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores ({cpu_description()}), "
                       f"Python {platform.python_version()}",
            "versions": {"torch": torch.__version__, "monai": monai.__version__, "nvflare": nvflare.__version__},
            "command": self.command, "wall_s": wall_s,
            "run_wall_s": sum(r.get("wall_s", 0.0) for r in runs),
            "bundle": bundle_record(self.bundle_dir),
            **self._plan_results(),
        }


def _curves(ws: Path, tags) -> Dict[str, Dict[str, Dict[int, float]]]:
    """``{tag: {site: {round: score}}}`` for each of ``tags`` (empty where not tracked), from the server's
    ``metrics_by_round.csv``, read once."""
    import csv

    curves: Dict[str, Dict[str, Dict[int, float]]] = {tag: {} for tag in tags}
    found = sorted(ws.rglob("results/metrics_by_round.csv"))
    if not found:
        return curves
    with open(found[0]) as f:
        for row in csv.DictReader(f):
            if row["tag"] in curves:
                curves[row["tag"]].setdefault(row["site"], {})[int(row["round"])] = float(row["value"])
    return curves


def _keep_logs_only(ws_root: Path) -> None:
    """Drop a finished run's checkpoints and caches; keep its logs and round metrics."""
    for path in sorted(ws_root.rglob("*"), reverse=True):
        if path.is_file() and not (path.name in ("log.txt", "metrics_by_round.csv", "summary.json")
                                   or path.suffix == ".json" and "results" in path.parts):
            path.unlink()
    for path in sorted(ws_root.rglob("*"), reverse=True):
        if path.is_dir() and not any(path.iterdir()):
            path.rmdir()
