"""The NVFlare recipe every method's recipe builds on: a federation of a MONAI bundle.

    from fedharmony.methods import recipe_class
    recipe = recipe_class("fedbn")(bundle_dir="bundles/prostate_mri_seg", num_rounds=10)
    recipe.execute(SimEnv(num_clients=6, num_threads=6))   # or recipe.export("build/jobs")

:class:`BundleRecipe` holds what every method shares (the bundle, rounds, sites, data,
overrides, resuming, privacy filters, cross-site evaluation, tracking, code shipping) and
validates it in one place. A method's recipe (``fedharmony/methods/<name>/server.py``) adds
only its own keyword-only settings and overrides the hooks below; it never sees another
method's flags.

The exported job folder is self-contained: the ``fedharmony`` package (without the phantom
generators, which no site runs) goes to ``app/custom/`` and the bundle to
``app/config/<bundle name>/``, so it runs with ``nvflare simulator`` and ``nvflare job
submit`` on machines that have neither this checkout nor the package installed.

With ``ship_code=False`` (sites that forbid custom code) the job carries neither: it names
the bundle (name, version, ``configs/`` digest) that the server and sites run from their
own installation, and its overrides must be plain values of the bundle's tunable ids
(``configs/tunables.json``), checked here and again on every participant
(:mod:`fedharmony.bundle.job_policy`). The method travels as a name and plain settings.
"""

import atexit
import os
import shutil
import tempfile
from typing import Dict, List, Optional

from nvflare.app_common.aggregators.model_aggregator import ModelAggregator
from nvflare.app_common.filters.percentile_privacy import PercentilePrivacy
from nvflare.app_common.widgets.convert_to_fed_event import ConvertToFedEvent
from nvflare.app_common.widgets.intime_model_selector import IntimeModelSelector
from nvflare.app_common.widgets.validation_json_generator import ValidationJsonGenerator
from nvflare.app_common.workflows.cross_site_model_eval import CrossSiteModelEval
from nvflare.app_common.workflows.fedavg import FedAvg
from nvflare.app_opt.pt.file_model_locator import PTFileModelLocator
from nvflare.app_opt.tracking.tb.tb_writer import TBWriter
from nvflare.job_config.api import FedJob
from nvflare.job_config.defs import FilterType
from nvflare.recipe.spec import Recipe
from nvflare.recipe.utils import add_experiment_tracking

import fedharmony

from fedharmony.bundle import job_policy
from fedharmony.methods import SPECS
from fedharmony.methods import spec as method_spec
from fedharmony.methods import site_method_class
from fedharmony.methods.protocols import check_protocol, protocol_overrides
from fedharmony.fl.aggregator import SiteUpdateAggregator
from fedharmony.fl.executor import BundleExecutor
from fedharmony.fl.fingerprint import FINGERPRINT_TASK, PREPROCESSING_KEYS, PREPROCESSING_TASK, FingerprintController
from fedharmony.fl.persistor import BundleModelPersistor
from fedharmony.fl.site_errors import SiteErrorLogger
from fedharmony.fl.summary import RoundSummaryWriter

PACKAGE_DIR = os.path.dirname(os.path.abspath(fedharmony.__file__))
NOT_SHIPPED = ("phantom", "study", "__pycache__")  # run here, never on a site
TRACKING = ("tensorboard", "mlflow", "wandb")
NEVER_MET = 1e30  # the stop condition early stopping needs and no bounded metric reaches: patience decides


class BundleRecipe(Recipe):
    """A federation of a MONAI bundle with one method; subclasses are the methods' recipes.

    Keyword-only args (every method):
        bundle_dir: the MONAI bundle to train (shipped inside the job, or named: ``ship_code``).
        num_rounds: FL rounds to run (from ``start_round``).
        min_clients: sites needed to start the job and to go on with it. Every round trains
            all connected sites; a site that dies mid-round is dropped from that round
            (NVFlare's dead-site watch), and the job stops when fewer than ``min_clients`` remain.
        local_epochs: local epochs per round.
        data_root: folder of site folders as seen by the sites ("" = each site's
            ``FEDHARMONY_DATA_ROOT`` / ``FEDHARMONY_DATASET_DIR``).
        overrides: bundle config overrides for every site (e.g. ``{"learning_rate": 1e-3}``).
        num_threads: torch threads per site process (0 = torch default).
        cross_site_eval: add NVFlare's cross-site evaluation after training.
        cross_site_timeout: seconds cross-site evaluation waits for a site's model and for each
            validation (None = NVFlare's 600 s / 6000 s). It starts a new workflow that does not
            know which sites died during training, so it waits for a dead site this long.
        name: job name (default ``<bundle>_<method>``).
        task_request_interval: seconds a site waits before asking the server for its next task.
        initial_model, start_round: resume: the server starts from this checkpoint (an absolute
            path on the server) and numbers rounds from ``start_round``.
        privacy_percentile, privacy_gamma: NVFlare's ``PercentilePrivacy`` on every training
            result a site sends: of the update (site model - global model), only the values above
            this percentile are shared, each clipped to +-gamma per local step. Off when None.
        ship_code: True: the package and the bundle travel in the job; overrides may be MONAI
            expressions and any config id, and a plain value on a tunable id is checked against
            the bundle's ``configs/tunables.json`` here (a typo fails now, not on every site).
            False: no code and no configs in the job (sites that forbid custom
            code run their installed package and bundle, which must match ``bundle_dir``'s
            version and ``configs/`` digest); overrides must be plain values of tunable ids;
            ``data_root`` must be empty.
        memory_gc_rounds: NVFlare's server-side ``gc.collect`` + ``malloc_trim`` every N rounds.
        score_after_training: sites also score their model after local training.
        tracking: experiment tracking on the server, through NVFlare's ``add_experiment_tracking``:
            ``tensorboard`` (default), ``mlflow`` or ``wandb`` (the package must be installed;
            credentials come from the server's environment, never from the job).
        patience: NVFlare's early stopping: stop after this many rounds in which the sites' mean validation
            ``key metric`` (the one they already send with each update) did not improve (None: run every round).
            NVFlare's ``FedAvg`` then saves ``FL_global_model.pt`` only in rounds that improved. Either way
            NVFlare's ``IntimeModelSelector`` writes ``best_FL_global_model.pt``: the global model whose mean
            validation score over the sites was the best, its round in the server log.
        protocol: ``paper`` (default) or ``released``: the authors' released code's choices, for the
            methods that have them (:mod:`fedharmony.methods.protocols`). Its bundle settings are
            merged into ``overrides`` here (an override that contradicts one is refused); a
            method's recipe makes its server-side choices from ``self.protocol``.
        fingerprint: before round 1, the sites' data fingerprints (header numbers) choose ``pixdim`` and
            ``image_size`` for every site (:mod:`fedharmony.fl.fingerprint`); refused with a hand-set
            ``pixdim`` / ``image_size`` and for a method whose network is built for one image size (HarmoFL).
        fingerprint_max_image_size: with ``fingerprint``, the largest crop (a multiple of 16).
        max_train_cases: the smallest site's training-set size, for a released protocol that cuts
            every site to it (HarmoFL's). The sites' data is not visible where a job is built, so
            it is given (the job scripts count it: ``fedharmony.data.datalist.smallest_split``), here
            or as the ``max_train_cases`` override.
        **method_settings: the method's own settings, as its ``SPEC`` declares them
            (:class:`fedharmony.methods.spec.Setting`: type, range, default), checked here; the values
            are in ``self.settings`` (defaults filled in), and go to the sites, the bundle overrides or
            the method's server side as each setting says (``python -m fedharmony methods`` lists them).
    """

    method = "fedavg"  # the registry name; each method's recipe sets its own
    has_global_model = True  # the server's checkpoint is a model (cross-site evaluation scores it)

    def __init__(self, *, bundle_dir: str = "bundles/prostate_mri_seg", num_rounds: int = 10, min_clients: int = 2,
                 local_epochs: int = 1, data_root: str = "", overrides: Optional[dict] = None, num_threads: int = 0,
                 cross_site_eval: bool = True, cross_site_timeout: Optional[int] = None, name: Optional[str] = None,
                 task_request_interval: float = 0.25, initial_model: Optional[str] = None, start_round: int = 0,
                 privacy_percentile: Optional[float] = None, privacy_gamma: float = 0.01, ship_code: bool = True,
                 memory_gc_rounds: int = 0, score_after_training: bool = False, tracking: str = "tensorboard",
                 protocol: str = "paper", max_train_cases: Optional[int] = None, patience: Optional[int] = None,
                 fingerprint: bool = False, fingerprint_max_image_size: Optional[int] = None, **method_settings):
        spec = method_spec(self.method)
        self.settings = _method_settings(spec, method_settings)
        site_cls = site_method_class(self.method)
        self.protocol = check_protocol(protocol, self.method)
        if not os.path.isfile(os.path.join(bundle_dir, "configs", "train.json")):
            raise FileNotFoundError(f"{bundle_dir} is not a bundle with configs/train.json")
        kind = bundle_kind(bundle_dir)
        if kind not in spec.bundle_kinds:
            raise ValueError(f"{self.method} trains {' and '.join(spec.bundle_kinds)} bundles; {bundle_dir} is a "
                             f"{kind} bundle")
        if not ship_code and not spec.no_code:
            raise ValueError(f"{self.method} cannot run on sites without job code (its SPEC says no_code=False); "
                             f"ship the code (ship_code=True)")
        _check_common(num_rounds=num_rounds, min_clients=min_clients, local_epochs=local_epochs, start_round=start_round,
                      memory_gc_rounds=memory_gc_rounds, cross_site_timeout=cross_site_timeout,
                      initial_model=initial_model, privacy_percentile=privacy_percentile,
                      privacy_gamma=privacy_gamma, overrides=overrides, patience=patience, tracking=tracking)
        self.bundle_dir, self.num_rounds, self.start_round = bundle_dir, num_rounds, start_round
        self.privacy_percentile, self.initial_model, self.cross_site_eval = privacy_percentile, initial_model, cross_site_eval
        config_files = ["configs/train.json"]
        if site_cls.overlay:
            if not os.path.isfile(os.path.join(bundle_dir, site_cls.overlay)):
                raise FileNotFoundError(f"{bundle_dir} has no {site_cls.overlay} (needed by {self.method})")
            config_files.append(site_cls.overlay)
        if fingerprint:
            _check_fingerprint(bundle_dir, config_files, overrides, fingerprint_max_image_size, self.method)
        elif fingerprint_max_image_size is not None:
            raise ValueError("fingerprint_max_image_size is for fingerprint=True")
        self.check()
        overrides = protocol_overrides(self.method, self.protocol, {**(overrides or {}), **self.bundle_overrides()},
                                       max_train_cases)
        site_settings = self.site_settings()
        site_cls.from_settings(site_settings)  # the sites will refuse what fails here: fail now instead
        _check_override_ids(bundle_dir, config_files, overrides)
        key_metric = bundle_key_metric(bundle_dir, config_files)
        bundle_name = os.path.basename(os.path.normpath(bundle_dir))
        if ship_code:  # the job's own copy of the bundle, inside each app
            if os.path.isfile(os.path.join(bundle_dir, job_policy.TUNABLES_FILE)):
                job_policy.check_tunable_values(overrides, job_policy.load_tunables(bundle_dir))
            bundle_args = {"bundle_root": f"config/{bundle_name}"}
        else:  # the participants' installed bundle, named and pinned
            if data_root:
                raise ValueError("data_root with ship_code=False: sites that run no job code take their data folder "
                                 "only from their own configuration (FEDHARMONY_DATASET_DIR / FEDHARMONY_DATA_ROOT)")
            job_policy.validate_overrides(overrides, job_policy.load_tunables(bundle_dir))
            bundle_args = {"bundle_name": bundle_name, "bundle_version": job_policy.bundle_version(bundle_dir),
                           "bundle_digest": job_policy.bundle_digest(bundle_dir)}
        self.config_files, self.overrides, self.local_keys = config_files, overrides, site_cls.local_keys
        self.name = name or f"{bundle_name}_{self.method}"

        job = FedJob(name=self.name, min_clients=min_clients)
        job.set_app_packages(["fedharmony"])  # shipped whole below, not file by file

        # server
        persistor = BundleModelPersistor(config_file=config_files, overrides=overrides,
                                         source_ckpt_file_full_name=initial_model, planned_geometry=fingerprint,
                                         **bundle_args)
        job.to_server(persistor, id="persistor")
        # num_clients=0: every round goes to all connected sites (a number would sample that many). Early stopping
        # is NVFlare's: FedAvg's patience counts rounds whose key metric did not improve; it needs a stop condition,
        # given here as one the metric never meets (Dice and F1 are at most 1), so patience alone decides.
        stopping = {"stop_cond": f"{key_metric} > {NEVER_MET}", "patience": patience} if patience else {}
        if fingerprint:  # the first workflow: the preprocessing is planned before round 1
            job.to_server(FingerprintController(max_image_size=fingerprint_max_image_size), id="fingerprint")
        job.to_server(FedAvg(num_clients=0, num_rounds=num_rounds, start_round=start_round, persistor_id="persistor",
                             aggregator=self.aggregator(), memory_gc_rounds=memory_gc_rounds, **stopping), id="fedavg")
        if self.has_global_model:  # best_FL_global_model.pt: the persistor saves it when this selector says so
            job.to_server(IntimeModelSelector(key_metric=key_metric), id="model_selector")
        if cross_site_eval:
            locator = ""
            if self.has_global_model:
                locator = "model_locator"
                job.to_server(PTFileModelLocator(pt_persistor_id="persistor"), id=locator)
            timeouts = {} if cross_site_timeout is None else {"submit_model_timeout": int(cross_site_timeout),
                                                               "validation_timeout": int(cross_site_timeout)}
            job.to_server(CrossSiteModelEval(model_locator_id=locator, **timeouts), id="cross_site_eval")
            job.to_server(ValidationJsonGenerator(), id="json_generator")
        job.to_server(RoundSummaryWriter(tag=key_metric, model=f"{site_cls.scored_model} model"), id="round_summary")
        job.to_server(SiteErrorLogger(), id="site_errors")
        job.to_server({"server": {"task_request_interval": task_request_interval}})
        self.add_server_components(job)

        # sites
        executor = BundleExecutor(config_files=config_files, data_root=data_root, **bundle_args,
                                  local_epochs=local_epochs, method=self.method, method_settings=site_settings,
                                  overrides=overrides, num_threads=num_threads,
                                  send_weight_diff=privacy_percentile is not None,
                                  score_after_training=score_after_training)
        job.to_clients(executor, tasks=["train", "validate", "submit_model"]
                       + ([FINGERPRINT_TASK, PREPROCESSING_TASK] if fingerprint else []))
        job.to_clients(TBWriter(event_type="analytix_log_stats"), id="log_writer")
        job.to_clients(ConvertToFedEvent(events_to_convert=["analytix_log_stats"], fed_event_prefix="fed."),
                       id="event_to_fed")
        if privacy_percentile is not None:
            # PercentilePrivacy works on an update, so the sites send (site - global) differences.
            # (NVFlare's ConvertWeights filter pair would do that conversion, but on 2.9 a result
            # filter no longer sees the task's global model: it logs an error and lets the full
            # weights through unfiltered.)
            job.to_clients(PercentilePrivacy(percentile=privacy_percentile, gamma=privacy_gamma,
                                             data_kinds=["WEIGHT_DIFF"]),
                           filter_type=FilterType.TASK_RESULT, tasks=["train"])

        # code-shipping jobs carry the package and the bundle (both apps: the server builds the network from it)
        if ship_code:
            package = _package_to_ship()
            for add in (job.add_file_to_server, job.add_file_to_clients):
                add(package, dest_dir="fedharmony", app_folder_type="custom")
                add(os.path.abspath(bundle_dir), dest_dir=bundle_name, app_folder_type="config")
        super().__init__(job)
        # NVFlare's helper: TensorBoard by default, MLflow / W&B as one setting
        add_experiment_tracking(self, tracking)

    # ------------------------------------------------------------------ hooks for a method's recipe
    def check(self):
        """Refuse generic settings this method cannot run with (called before anything is built)."""

    def bundle_overrides(self) -> Dict[str, object]:
        """Bundle config values the method's settings set (its ``goes_to="bundle"`` settings, e.g. HarmoFL's
        ``amp_ratio``)."""
        return method_spec(self.method).going_to("bundle", self.settings)

    def site_settings(self) -> Dict[str, object]:
        """The settings the sites' method object gets (its ``goes_to="site"`` settings, plain values)."""
        return method_spec(self.method).going_to("site", self.settings)

    def aggregator(self) -> ModelAggregator:
        """The server's aggregator (default: the sample-weighted mean, with the method's local keys)."""
        return SiteUpdateAggregator(local_keys=self.local_keys, persistor_id="persistor")

    def add_server_components(self, job: FedJob):
        """Extra server components (IOP-FL: the model pool writer)."""


def _check_fingerprint(bundle_dir: str, config_files, overrides: Optional[dict], max_image_size, method: str):
    """Refuse what a fingerprint-planned job cannot do: a hand-set ``pixdim`` / ``image_size`` (the fingerprint
    would silently replace it), a bad cap, a method whose network is built for one image size."""
    given = sorted(set(overrides or {}) & set(PREPROCESSING_KEYS))
    if given:
        raise ValueError(f"fingerprint chooses {list(PREPROCESSING_KEYS)}; the overrides set {given} by hand: drop "
                         f"one or the other (fingerprint_max_image_size caps the crop)")
    if max_image_size is not None and (isinstance(max_image_size, bool) or not isinstance(max_image_size, int)
                                       or max_image_size < 16 or max_image_size % 16):
        raise ValueError(f"fingerprint_max_image_size must be a positive multiple of 16, got {max_image_size!r}")
    for name in config_files[1:]:  # a method overlay that builds its network for @image_size (HarmoFL's AmpNorm)
        with open(os.path.join(bundle_dir, name)) as f:
            if "@image_size" in f.read():
                raise ValueError(f"{method}'s network ({name}) is built for one image_size before the sites send "
                                 f"their fingerprints: plan pixdim and image_size with tools/fingerprint.py and pass "
                                 f"them as overrides instead")


def _check_common(*, num_rounds, min_clients, local_epochs, start_round, memory_gc_rounds, cross_site_timeout,
                  initial_model, privacy_percentile, privacy_gamma, overrides, patience, tracking):
    """Refuse a setting every method shares that no job can run with (each error names it)."""
    if num_rounds < 1 or min_clients < 1 or local_epochs < 1:
        raise ValueError("num_rounds, min_clients and local_epochs must be >= 1")
    if start_round < 0 or memory_gc_rounds < 0:
        raise ValueError("start_round and memory_gc_rounds must be >= 0")
    if cross_site_timeout is not None and cross_site_timeout < 1:
        raise ValueError(f"cross_site_timeout must be >= 1 s, got {cross_site_timeout}")
    if initial_model is not None and not os.path.isabs(initial_model):
        raise ValueError(f"initial_model must be an absolute path on the server, got {initial_model!r}")
    if privacy_percentile is not None and not (0 <= privacy_percentile < 100 and privacy_gamma > 0):
        raise ValueError(f"privacy_percentile must be in [0, 100) and privacy_gamma > 0, "
                         f"got {privacy_percentile}, {privacy_gamma}")
    if overrides is not None and not isinstance(overrides, dict):
        raise TypeError(f"overrides must be a dict of bundle config ids, got {type(overrides).__name__}")
    if patience is not None and (isinstance(patience, bool) or not isinstance(patience, int) or patience < 1):
        raise ValueError(f"patience must be a whole number of rounds >= 1, got {patience!r}")
    if tracking not in TRACKING:
        raise ValueError(f"tracking must be one of {TRACKING}, got {tracking!r}")


def _method_settings(spec, method_settings: dict) -> Dict[str, object]:
    """The method's own settings checked against its ``SPEC``, defaults filled in; a name the method does not
    have is refused naming the method that has it, or the settings every method shares."""
    foreign = sorted(set(method_settings) - {s.name for s in spec.settings})
    if foreign:
        owners = {x.name: s.name for s in SPECS.values() for x in s.settings}
        where = "; ".join(f"{k!r} is {owners[k]}'s" if k in owners else f"{k!r} is no setting of any method"
                          for k in foreign)
        raise ValueError(f"{foreign} {'is not a setting' if len(foreign) == 1 else 'are not settings'} of "
                         f"{spec.name} ({where}); its own settings: {[s.name for s in spec.settings]}; "
                         f"every method's: {sorted(_common_settings())}")
    return spec.resolve(method_settings)


def _common_settings():
    import inspect

    return {n for n, p in inspect.signature(BundleRecipe.__init__).parameters.items() if p.kind == p.KEYWORD_ONLY}


def bundle_kind(bundle_dir: str) -> str:
    """``segmentation`` or ``classification``: the bundle's ``network_data_format.outputs.pred.format``
    (``segmentation`` / ``classes``) in ``configs/metadata.json``."""
    import json

    path = os.path.join(bundle_dir, "configs", "metadata.json")
    try:
        with open(path) as f:
            fmt = json.load(f)["network_data_format"]["outputs"]["pred"]["format"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: cannot read network_data_format.outputs.pred.format ({type(e).__name__}: {e})")
    kinds = {"segmentation": "segmentation", "classes": "classification"}
    if fmt not in kinds:
        raise ValueError(f"{path}: output format {fmt!r} is neither 'segmentation' nor 'classes'")
    return kinds[fmt]


def _package_to_ship() -> str:
    """A copy of the package without what runs only here (phantom generators, the study tool)."""
    tmp = tempfile.mkdtemp(prefix="fedharmony_pkg_")
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)  # the job is exported / run by then
    out = os.path.join(tmp, "fedharmony")
    shutil.copytree(PACKAGE_DIR, out, ignore=shutil.ignore_patterns(*NOT_SHIPPED, "*.pyc"))
    return out


def _check_override_ids(bundle_dir: str, config_files, overrides: dict):
    """An override must name an id the bundle's configs define: a typo would otherwise add a
    new, unused id and silently change nothing."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([os.path.join(bundle_dir, f) for f in config_files])
    unknown = sorted(k for k in overrides if k not in parser)
    if unknown:
        raise KeyError(f"unknown bundle config id(s) in overrides: {unknown} (not in {bundle_dir} {config_files})")
    tasks = parser.get("tasks")
    if "task" in overrides and isinstance(tasks, dict) and overrides["task"] not in tasks:
        raise KeyError(f"unknown task {overrides['task']!r}; {bundle_dir} defines {sorted(tasks)}")


def bundle_key_metric(bundle_dir: str, config_files: List[str]) -> str:
    """The bundle's key validation metric (first key of ``validate#evaluator#key_val_metric``)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([os.path.join(bundle_dir, f) for f in config_files])
    metric = parser["validate#evaluator#key_val_metric"]
    while isinstance(metric, str) and metric.startswith("@"):
        metric = parser[metric[1:]]
    if not isinstance(metric, dict) or not metric:
        raise KeyError(f"{bundle_dir}: validate#evaluator#key_val_metric is not a {{name: metric}} dict")
    return next(iter(metric))
