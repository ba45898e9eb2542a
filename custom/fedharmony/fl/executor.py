"""Site-side NVFlare executor that drives a MONAI bundle through :class:`fedharmony.bundle.site.BundleSite`.

Why an ``Executor`` and not a Client API script: the executor gets the FL context
(site name, the run's folder on the site's disk, the job's abort signal), lifecycle
events, and one object per site that holds the bundle between tasks without a
script thread; it is also a plain class path a site can allow-list when it forbids
custom code. The training logic itself lives in ``BundleSite``, which has no NVFlare
import.

Tasks:
  * ``train``: one round of the job's method on this site
    (:meth:`fedharmony.bundle.site.BundleSite.run_round`): take the server's answer, score the
    site's model on its validation split (tracked per round, and sent back as the metric),
    train ``local_epochs``, send what the method sends, with ``NUM_STEPS_CURRENT_ROUND`` and
    the number of training cases (``num_samples``, the FedAvg weight).
  * ``validate`` (cross-site evaluation): score the received model on the site's
    *testing* split, with the site's local keys (FedBN norm layers) kept.
  * ``submit_model``: send the site's own model: its best on its validation split (for a
    personalized method, IOP-FL or Ditto, its best personalized model).
  * ``fingerprint`` and ``set_preprocessing`` (jobs built with ``--fingerprint``, before round 1): send the
    header numbers of the site's training scans; take the federation's ``pixdim`` / ``image_size``, checked
    as any override, before the bundle is built (:mod:`fedharmony.fl.fingerprint`).

The executor names no method: ``method`` (a name from :data:`fedharmony.methods.METHODS`) and
``method_settings`` (plain values, checked by the method) come from the job, and everything a
method does differently happens inside its :class:`fedharmony.methods.SiteMethod`.

``score_after_training``: also score the site's model after local training (tracked as
``<key metric>_after_training``): with the round-start score this shows what a
communication does to the model a site uses (the "retrogress" of PRR-FL's paper).

Metric names come from the bundle (its evaluator's key metric: ``val_mean_dice`` for the
prostate bundle, ``val_macro_f1`` for the classification bundles).

What the job may decide (``fedharmony.fl.policy``): a job that carries code runs its bundle
copy and overrides as they are. A job without code (a site that forbids custom code runs
only such jobs) names a bundle by ``bundle_name`` / ``bundle_version`` / ``bundle_digest``:
the site runs its own installed copy, checks both against it, takes overrides only as plain
values of the bundle's tunable ids, refuses a ``data_root`` from the job, and strips its
absolute paths from the errors it sends to the server. A refused job is refused at
START_RUN, before any config is parsed; every task then answers with the reason.

Where a site's data is (no job edit per site), first match wins:
  1. ``FEDHARMONY_DATASET_DIR``: this site's data folder (production sites);
  2. ``<data_root>/<site name>``, with ``data_root`` from the job or ``FEDHARMONY_DATA_ROOT``;
  3. ``<data_root>/sites.json``: maps simulator names (``site-1`` ...) to folders.
"""

import os
import time
from typing import Optional

import numpy as np
import torch
from nvflare.apis.dxo import DXO, DataKind, from_shareable
from nvflare.apis.event_type import EventType
from nvflare.apis.executor import Executor
from nvflare.apis.fl_constant import FLContextKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable, make_reply
from nvflare.apis.signal import Signal
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.utils.fl_model_utils import FLModelUtils

from fedharmony.bundle.site import BundleSite
from fedharmony.core.files import SITE_MAP_NAME, read_site_map
from fedharmony.bundle.job_policy import PolicyError, redact_paths
from fedharmony.methods import make_site_method
from fedharmony.methods import spec as method_spec
from fedharmony.fl.aggregator import NUM_SAMPLES
from fedharmony.fl.fingerprint import FINGERPRINT_TASK, PREPROCESSING_KEYS, PREPROCESSING_TASK
from fedharmony.fl.policy import JobBundle, resolve_job_bundle
from fedharmony.fl.site_errors import ERROR_HEADER

DATASET_DIR_ENV = "FEDHARMONY_DATASET_DIR"
DATA_ROOT_ENV = "FEDHARMONY_DATA_ROOT"


def resolve_dataset_dir(site: str, data_root: str = "") -> str:
    """Find a site's data folder (see the module docstring for the order)."""
    direct = os.environ.get(DATASET_DIR_ENV)
    if direct:
        if not os.path.isdir(direct):
            raise FileNotFoundError(f"site {site!r}: {DATASET_DIR_ENV}={direct} is not a folder")
        return direct
    root = data_root or os.environ.get(DATA_ROOT_ENV, "")
    if not root:
        raise FileNotFoundError(f"site {site!r}: no data location; set {DATASET_DIR_ENV} (this site's folder) or "
                                f"{DATA_ROOT_ENV} / the job's data_root (a folder of site folders)")
    candidate = os.path.join(root, site)
    if os.path.isdir(candidate):
        return candidate
    mapped = read_site_map(root).get(site)
    if mapped and os.path.isdir(os.path.join(root, mapped)):
        return os.path.join(root, mapped)
    raise FileNotFoundError(f"site {site!r}: no folder {candidate} and no entry for {site!r} in "
                            f"{os.path.join(root, SITE_MAP_NAME)}")


def _describe(error: BaseException) -> str:
    """``Type: message`` of the root cause: MONAI's config parser wraps the error that names the
    file (e.g. SiteDataError) in a RuntimeError that only quotes the config expression."""
    while error.__cause__ is not None:
        error = error.__cause__
    return f"{type(error).__name__}: {error}"


def _to_tensors(params: dict) -> dict:
    return {k: torch.as_tensor(np.asarray(v)) for k, v in params.items()}


def _to_numpy(weights: dict) -> dict:
    return {k: v.numpy() for k, v in weights.items()}


def weight_diff(weights: dict, base: dict) -> dict:
    """``weights - base`` key by key (a site's update against the global model it received)."""
    missing = sorted(set(weights) - set(base))
    if missing:
        raise ValueError(f"cannot send a weight difference: the received global model lacks {missing[:5]}")
    return {k: (np.asarray(v) - base[k]).astype(np.asarray(v).dtype) for k, v in weights.items()}


class BundleExecutor(Executor):
    """Runs the bundle's train / validate / submit_model for one site.

    Args:
        bundle_root: the job's bundle copy, relative to the site's app root (jobs that carry code).
        bundle_name, bundle_version, bundle_digest: the site's installed bundle a job without code
            runs, and the version / ``configs/`` digest it was built against (see the module docstring).
        config_files: bundle configs to layer (default ``configs/train.json``).
        data_root: folder of site folders (default: ``$FEDHARMONY_DATA_ROOT``; jobs that carry code only).
        local_epochs: local epochs per round.
        method: the federated method's name (``fedavg``, ``fedbn``, ... :data:`fedharmony.methods.METHODS`).
        method_settings: its settings (``{"mu": 0.01}`` for FedProx), plain values only.
        overrides: bundle config overrides (``{"learning_rate": 0.001, ...}``).
        num_threads: torch CPU threads for this site (0 = torch's default).
        writer_id: id of the experiment-tracking LogWriter component ("" = none).
        send_weight_diff: send the round's update (site model - received global model) as
            NVFlare ``WEIGHT_DIFF`` instead of the full weights, so NVFlare's privacy filters
            on differences (``PercentilePrivacy``, ``SVTPrivacy``) apply to what leaves the site.
        score_after_training: also score the site's model on its validation split after local
            training (PRR-FL always does: its personalized model is the site's result).
    """

    def __init__(self, bundle_root: str = "", config_files: Optional[list] = None,
                 data_root: str = "", local_epochs: int = 1, bundle_name: str = "", bundle_version: str = "",
                 bundle_digest: str = "", method: str = "fedavg", method_settings: Optional[dict] = None,
                 overrides: Optional[dict] = None, num_threads: int = 0,
                 writer_id: str = "log_writer", send_weight_diff: bool = False, score_after_training: bool = False):
        super().__init__()
        self.score_after_training = score_after_training
        self.send_weight_diff = send_weight_diff
        self.method = method
        self.method_settings = method_settings or {}
        self.bundle_root = bundle_root
        self.bundle_name = bundle_name
        self.bundle_version = bundle_version
        self.bundle_digest = bundle_digest
        self.config_files = config_files
        self.bundle: Optional[JobBundle] = None
        self.refusal = ""  # why this site refused the job (policy), sent as every task's error
        self.dataset_dir = ""
        self.redact_roots = {}
        self.data_root = data_root
        self.local_epochs = local_epochs
        self.overrides = overrides or {}
        self.num_threads = num_threads
        self.writer_id = writer_id
        self.site: Optional[BundleSite] = None
        self.writer = None

    def handle_event(self, event_type: str, fl_ctx: FLContext):
        if event_type == EventType.START_RUN:
            self._apply_policy(fl_ctx)
            if self.num_threads:
                torch.set_num_threads(self.num_threads)
            if self.writer_id:
                self.writer = fl_ctx.get_engine().get_component(self.writer_id)
        elif event_type == EventType.END_RUN and self.site is not None:
            self.site.save_state()

    def _apply_policy(self, fl_ctx: FLContext):
        """Decide, before anything is parsed, which bundle, configs and overrides this job gets here."""
        if self.bundle is not None or self.refusal:
            return
        name = fl_ctx.get_identity_name()
        workspace = fl_ctx.get_engine().get_workspace()
        self.redact_roots = {"<run>": workspace.get_run_dir(fl_ctx.get_job_id()),
                             "<app>": fl_ctx.get_prop(FLContextKey.APP_ROOT) or "",
                             "<workspace>": workspace.get_root_dir(),
                             "<data-root>": os.environ.get(DATA_ROOT_ENV, "")}
        try:
            self.bundle = resolve_job_bundle(
                fl_ctx, bundle_root=self.bundle_root, bundle_name=self.bundle_name,
                bundle_version=self.bundle_version, bundle_digest=self.bundle_digest,
                config_files=self.config_files, overrides=self.overrides, data_root=self.data_root)
            make_site_method(self.method, self.method_settings)  # a name and plain settings, checked before use
            if not self.bundle.trusted and not method_spec(self.method).no_code:
                raise PolicyError(f"method {self.method!r} needs the job's code (its SPEC says no_code=False), and "
                                  f"this job runs the site's installed package")
        except PolicyError as e:
            self.refusal = f"{name}: job refused by this site's policy: {e}"
            self.log_error(fl_ctx, self.refusal)
            return
        except ValueError as e:
            self.refusal = f"{name}: job refused: {e}"
            self.log_error(fl_ctx, self.refusal)
            return
        self.redact_roots["<bundle>"] = self.bundle.root
        mode = "job ships code: its bundle copy and overrides as given" if self.bundle.trusted else (
            f"no job code: installed bundle {self.bundle.root}, overrides {self.bundle.overrides}")
        self.log_info(fl_ctx, f"{name}: {mode}")

    def _site(self, fl_ctx: FLContext) -> BundleSite:
        self._apply_policy(fl_ctx)
        if self.refusal:
            raise PolicyError(self.refusal)
        if self.site is None:
            name = fl_ctx.get_identity_name()
            run_dir = fl_ctx.get_engine().get_workspace().get_run_dir(fl_ctx.get_job_id())
            dataset_dir = resolve_dataset_dir(name, self.data_root)
            self.dataset_dir = self.redact_roots["<data>"] = dataset_dir
            t0 = time.time()
            self.site = BundleSite(
                bundle_root=self.bundle.root,
                dataset_dir=dataset_dir,
                state_dir=os.path.join(run_dir, "fedharmony", name),
                site_name=name,
                overrides=self.bundle.overrides,
                config_file=self.bundle.config_files,
                method=self.method,
                method_settings=self.method_settings,
            )
            self.data_name = os.path.basename(os.path.normpath(dataset_dir))
            self.log_info(fl_ctx, f"{name}: bundle ready in {time.time() - t0:.1f} s, data {dataset_dir}, "
                                  f"state in {self.site.state_dir}, method {self.method} {self.site.method.settings() or ''}, "
                                  f"{len(self.site.local_key_names)} local keys")
        return self.site

    def _fingerprint(self, fl_ctx: FLContext) -> Shareable:
        """This site's data fingerprint: header numbers of its training scans (fedharmony.data.fingerprint)."""
        from fedharmony.data.fingerprint import site_fingerprint

        self._apply_policy(fl_ctx)
        if self.refusal:
            raise PolicyError(self.refusal)
        name = fl_ctx.get_identity_name()
        dataset_dir = resolve_dataset_dir(name, self.data_root)
        fingerprint = site_fingerprint(dataset_dir)
        fingerprint["site"] = name  # the server knows the site by its name, not by its folder's
        fingerprint["unread_names"] = [redact_paths(n, self.redact_roots) for n in fingerprint["unread_names"]]
        self.log_info(fl_ctx, f"{name}: fingerprint of {fingerprint['count']} training scans sent "
                              f"({fingerprint['unread']} unread)")
        return DXO(DataKind.COLLECTION, data=fingerprint).to_shareable()

    def _set_preprocessing(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        """Take the federation's ``pixdim`` / ``image_size`` (checked as any job override) before the bundle is
        built; refused once it is (training has started with other values)."""
        from fedharmony.bundle.job_policy import load_tunables, validate_overrides

        self._apply_policy(fl_ctx)
        if self.refusal:
            raise PolicyError(self.refusal)
        settings = from_shareable(shareable).data
        if not isinstance(settings, dict) or not settings or set(settings) - set(PREPROCESSING_KEYS):
            raise ValueError(f"set_preprocessing takes {list(PREPROCESSING_KEYS)} only, got {settings!r}")
        validate_overrides(settings, load_tunables(self.bundle.root))
        if self.site is not None:
            raise ValueError("set_preprocessing after the bundle was built: the site already trains with other values")
        self.bundle.overrides = {**self.bundle.overrides, **settings}
        self.log_info(fl_ctx, f"{fl_ctx.get_identity_name()}: preprocessing from the federation's fingerprint: "
                              f"{settings}")
        return make_reply(ReturnCode.OK)

    def execute(self, task_name: str, shareable: Shareable, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        try:
            if task_name == FINGERPRINT_TASK:  # before the bundle is built: it reads headers, not the data
                return self._fingerprint(fl_ctx)
            if task_name == PREPROCESSING_TASK:
                return self._set_preprocessing(shareable, fl_ctx)
            site = self._site(fl_ctx)
            if abort_signal.triggered:
                return make_reply(ReturnCode.TASK_ABORTED)
            if task_name == AppConstants.TASK_TRAIN:
                return self._train(site, shareable, fl_ctx)
            if task_name == AppConstants.TASK_VALIDATION:
                return self._validate(site, shareable, fl_ctx)
            if task_name == AppConstants.TASK_SUBMIT_MODEL:
                meta = {"data": self.data_name}
                if site.best_round >= 0:
                    meta.update(best_round=site.best_round, best_metric=site.best_metric)
                return DXO(DataKind.WEIGHTS, _to_numpy(site.best_model()), meta=meta).to_shareable()
            self.log_error(fl_ctx, f"unknown task {task_name!r}")
            return make_reply(ReturnCode.TASK_UNKNOWN)
        except PolicyError as e:
            self.log_error(fl_ctx, f"task {task_name!r} not run: {e}")
            return self._error_reply(str(e))
        except Exception as e:  # report, do not crash the site: the server decides what to do
            message = _describe(e)
            self.log_exception(fl_ctx, f"{fl_ctx.get_identity_name()}: task {task_name!r} failed: {message}")
            return self._error_reply(message)

    def _error_reply(self, message: str) -> Shareable:
        """A failed task's reply; its ``error`` header reaches the server's log (SiteErrorLogger). A site
        that runs no job code sends no absolute path of its own (paths under its data folder stay relative)."""
        if self.bundle is None or not self.bundle.trusted:
            if not self.dataset_dir:  # the data folder was not resolved yet: still hide the configured one
                self.redact_roots.setdefault("<data>", os.environ.get(DATASET_DIR_ENV) or
                                             os.environ.get(DATA_ROOT_ENV, ""))
            message = redact_paths(message, self.redact_roots)
        reply = make_reply(ReturnCode.EXECUTION_EXCEPTION)
        reply.set_header(ERROR_HEADER, message)
        return reply

    def _train(self, site: BundleSite, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        model = FLModelUtils.from_shareable(shareable)
        current_round = model.current_round if model.current_round is not None else site.round
        # a copy: training may write into arrays that share memory with the received ones
        received = {k: np.array(v, copy=True) for k, v in (model.params or {}).items()} if self.send_weight_diff else {}
        report = site.run_round(_to_tensors(model.params or {}), model.meta or {}, self.local_epochs,
                                score_after_training=self.score_after_training)
        key = report.key_metric
        self.log_info(fl_ctx, f"{fl_ctx.get_identity_name()} round {current_round}: {site.method.scored_model} "
                              f"{key} {report.metrics[key]:.4f}{report.note}, {report.steps} local steps, "
                              f"task {report.seconds:.1f} s (validation {report.eval_seconds:.1f} s)")
        if self.writer is not None:
            for tag, value in report.tracked.items():
                self.writer.add_scalar(tag, value, global_step=current_round)
            for tag, values in report.per_epoch.items():
                for epoch, value in enumerate(values):
                    self.writer.add_scalar(tag, value, global_step=current_round * self.local_epochs + epoch)
            self.writer.add_scalar("site_task_seconds", report.seconds, global_step=current_round)
        params, params_type = _to_numpy(report.weights), ParamsType.FULL
        if self.send_weight_diff:
            params, params_type = weight_diff(params, received), ParamsType.DIFF
        out = FLModel(params=params, params_type=params_type, metrics=report.metrics, current_round=current_round,
                      meta={"NUM_STEPS_CURRENT_ROUND": report.steps, NUM_SAMPLES: site.num_train_cases,
                            "site_task_seconds": report.seconds, **report.meta})
        return FLModelUtils.to_shareable(out)

    def _validate(self, site: BundleSite, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        dxo = from_shareable(shareable)
        owner = shareable.get_header(AppConstants.MODEL_OWNER, "?")
        metrics = site.evaluate(_to_tensors(dxo.data), "testing")
        self.log_info(fl_ctx, f"cross-site: model of {owner} on {fl_ctx.get_identity_name()}'s test split: {metrics}")
        return DXO(DataKind.METRICS, metrics).to_shareable()
