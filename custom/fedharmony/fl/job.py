"""NVFlare jobs for fedharmony: one recipe, the algorithm is a flag, the task is the bundle.

    recipe = FedHarmonyRecipe(algorithm="fedbn", bundle_dir="bundles/prostate_mri_seg", num_rounds=10)
    recipe.execute(SimEnv(num_clients=6, num_threads=6))   # or recipe.export("build/jobs")

The exported job folder is self-contained: the ``fedharmony`` package goes to
``app/custom/`` and the bundle to ``app/config/<bundle name>/``, so it runs with
``nvflare simulator`` and ``nvflare job submit`` on machines that have neither this
checkout nor the package installed.

With ``ship_code=False`` (sites that forbid custom code) the job carries neither: it names
the bundle (name, version, ``configs/`` digest) that the server and sites run from their
own installation, and its overrides must be plain values of the bundle's tunable ids
(``configs/tunables.json``), checked here and again on every participant
(:mod:`fedharmony.job_policy`).
"""

import os
from typing import Optional

from nvflare.app_common.filters.percentile_privacy import PercentilePrivacy
from nvflare.app_common.widgets.convert_to_fed_event import ConvertToFedEvent
from nvflare.app_common.widgets.validation_json_generator import ValidationJsonGenerator
from nvflare.app_common.workflows.cross_site_model_eval import CrossSiteModelEval
from nvflare.app_common.workflows.fedavg import FedAvg
from nvflare.app_opt.pt.file_model_locator import PTFileModelLocator
from nvflare.app_opt.tracking.tb.tb_receiver import TBAnalyticsReceiver
from nvflare.app_opt.tracking.tb.tb_writer import TBWriter
from nvflare.job_config.api import FedJob
from nvflare.job_config.defs import FilterType
from nvflare.recipe.spec import Recipe

import fedharmony

from .aggregator import FourierAggregator, SiteUpdateAggregator
from .executor import BundleExecutor
from .. import deputy, fourier_aggregation, job_policy
from ..personalization import check_personalization_alpha
from .persistor import BundleModelPersistor
from .pool import ModelPoolWriter
from .site_errors import SiteErrorLogger
from .summary import RoundSummaryWriter

# State-dict keys of normalization layers: MONAI's ADN blocks ("adn.N"), torchvision-style
# "bn1" / "norm1", and DenseNet's "norm". FedBN keeps them on each site.
NORM_LAYER_KEYS = r"(\.adn\.N\.|(^|\.)(bn|norm)\d*\.)"

ALGORITHMS = ("fedavg", "fedprox", "fedbn", "harmofl", "iopfl", "prrfl")
HARMOFL_CONFIG = "configs/harmofl.json"
PRRFL_CONFIG = "configs/prrfl.json"
PACKAGE_DIR = os.path.dirname(os.path.abspath(fedharmony.__file__))


class FedHarmonyRecipe(Recipe):
    """A FedAvg-family federation of a MONAI bundle, with cross-site evaluation and tracking.

    Args:
        algorithm: ``fedavg`` (sample-weighted mean), ``fedprox`` (+ proximal term ``mu``),
            ``fedbn`` (normalization layers stay on each site), ``harmofl`` (the bundle's
            ``configs/harmofl.json`` layered on: amplitude normalization + weight
            perturbation; the server averages the amplitude target with the weights),
            ``iopfl`` (FedAvg underneath; each site keeps a personalized model, scores it
            every round, returns it for cross-site evaluation; the server writes the model
            pool, global + personalized models, to ``<run dir>/model_pool/`` at the end),
            ``prrfl`` (each site trains a personalized model and a deputy with deputy-enhanced
            transfer; the server aggregates the deputies with progressive Fourier aggregation;
            norm layers stay on the sites; the personalized models are the result: what
            sites score, keep and return for cross-site evaluation. There is no global model).
        bundle_dir: the MONAI bundle to train (shipped inside the job).
        num_rounds: FL rounds to run (from ``start_round``).
        min_clients: sites needed to start the job and to go on with it. Every round trains
            all connected sites; a site that dies mid-round is dropped from that round
            (NVFlare's dead-site watch), and the job stops when fewer than ``min_clients``
            remain.
        local_epochs: local epochs per round.
        mu: FedProx strength (only for ``fedprox``).
        data_root: folder of site folders as seen by the sites ("" = each site's
            ``FEDHARMONY_DATA_ROOT`` / ``FEDHARMONY_DATASET_DIR``).
        overrides: bundle config overrides for every site (e.g. ``{"learning_rate": 1e-3}``).
        num_threads: torch threads per site process (0 = torch default).
        cross_site_eval: add NVFlare's cross-site evaluation after training.
        cross_site_timeout: seconds cross-site evaluation waits for a site's model and for each
            validation (None = NVFlare's 600 s / 6000 s). It starts a new workflow that does not
            know which sites died during training, so it waits for a dead site this long
            before it finishes without it.
        name: job name (default ``<bundle>_<algorithm>``).
        task_request_interval: seconds a site waits before asking the server for its next
            task (NVFlare's default is 2 s; every round pays up to that while sites poll).
        amp_mode, amp_ratio, wp_alpha, image_size: HarmoFL settings (``harmofl`` only; None
            keeps the bundle's): ``paper`` / ``released`` / ``off``, the window ratio L in
            [0, 0.5], the perturbation strength (0 = off), the common in-plane size.
        iop_alpha: IOP-FL's personalization weight a in [0, 1) (``iopfl`` only; default 0.1,
            the released value): phi <- a * phi + (1 - a) * theta each round.
        initial_model, start_round: resume: the server starts from this checkpoint (a path on
            the server, e.g. the ``FL_global_model.pt`` of a run that died) and numbers
            rounds from ``start_round``.
        privacy_percentile, privacy_gamma: NVFlare's ``PercentilePrivacy`` on every training
            result a site sends: of the update (site model - global model), only the values
            whose size is above this percentile are shared, each clipped to +-gamma per local
            step (NVFlare divides the update by the round's step count before the cut and the
            clip); the rest is sent as zero (no change). Off when None.
        ship_code: True: the ``fedharmony`` package and the bundle travel in the job (``custom/``,
            ``config/``); overrides may be MONAI expressions (the job's code runs anyway).
            False: no code and no configs in the job, for sites that forbid custom code: server
            and sites run their installed package (allow-listed classes) and installed bundle,
            which must match the version and ``configs/`` digest of ``bundle_dir``; overrides
            must be plain values of the bundle's tunable ids; ``data_root`` must be empty
            (each site's data folder is its own setting).
        memory_gc_rounds: NVFlare's server-side ``gc.collect`` + ``malloc_trim`` every N rounds
            (0 = off).
        prrfl_r0, prrfl_r1: PRR-FL's shared spectral ratio grows from r0 (round 0) towards r1
            (released 0.7, 0.95); both in (0, 1], r0 <= r1.
        prrfl_alpha1, prrfl_alpha2: PRR-FL's stage thresholds (released 0.7, 0.9).
        prrfl_weighted: weight the mean amplitude by training-set size (default: uniform, as released).
        score_after_training: sites also score their model after local training (tracked as
            ``<key metric>_after_training``; always on for ``prrfl``).
    """

    def __init__(self, algorithm: str = "fedavg", bundle_dir: str = "bundles/prostate_mri_seg", num_rounds: int = 10,
                 min_clients: int = 2, local_epochs: int = 1, mu: float = 0.01, data_root: str = "",
                 overrides: Optional[dict] = None, num_threads: int = 0, cross_site_eval: bool = True,
                 name: Optional[str] = None, task_request_interval: float = 0.25,
                 amp_mode: Optional[str] = None, amp_ratio: Optional[float] = None, wp_alpha: Optional[float] = None,
                 image_size: Optional[int] = None, iop_alpha: Optional[float] = None,
                 initial_model: Optional[str] = None, start_round: int = 0,
                 privacy_percentile: Optional[float] = None, privacy_gamma: float = 0.01,
                 ship_code: bool = True, memory_gc_rounds: int = 0, cross_site_timeout: Optional[int] = None,
                 prrfl_r0: Optional[float] = None, prrfl_r1: Optional[float] = None,
                 prrfl_alpha1: Optional[float] = None, prrfl_alpha2: Optional[float] = None,
                 prrfl_weighted: bool = False, score_after_training: bool = False):
        if algorithm not in ALGORITHMS:
            raise ValueError(f"unknown algorithm {algorithm!r}; choose one of {ALGORITHMS}")
        if not os.path.isfile(os.path.join(bundle_dir, "configs", "train.json")):
            raise FileNotFoundError(f"{bundle_dir} is not a bundle with configs/train.json")
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
        if algorithm == "fedprox" and not mu > 0:
            raise ValueError(f"FedProx needs mu > 0, got {mu}")
        if overrides is not None and not isinstance(overrides, dict):
            raise TypeError(f"overrides must be a dict of bundle config ids, got {type(overrides).__name__}")
        overrides = dict(overrides or {})
        config_files = ["configs/train.json"]
        harmofl = {"amp_mode": amp_mode, "amp_ratio": amp_ratio, "wp_alpha": wp_alpha, "image_size": image_size}
        if algorithm == "harmofl":
            if not os.path.isfile(os.path.join(bundle_dir, HARMOFL_CONFIG)):
                raise FileNotFoundError(f"{bundle_dir} has no {HARMOFL_CONFIG}")
            _check_harmofl(**harmofl)
            config_files.append(HARMOFL_CONFIG)
            overrides.update({k: v for k, v in harmofl.items() if v is not None})
        elif any(v is not None for v in harmofl.values()):
            raise ValueError(f"amp_mode / amp_ratio / wp_alpha / image_size are HarmoFL settings; "
                             f"algorithm is {algorithm!r} (use overrides={{'image_size': ...}} for the size)")
        if algorithm == "iopfl":
            if not cross_site_eval:
                raise ValueError("iopfl collects the model pool through cross-site evaluation; keep it on")
            iop_alpha = check_personalization_alpha(0.1 if iop_alpha is None else iop_alpha)
        elif iop_alpha is not None:
            raise ValueError(f"iop_alpha is an IOP-FL setting; algorithm is {algorithm!r}")
        prrfl = {"prrfl_r0": prrfl_r0, "prrfl_r1": prrfl_r1, "prrfl_alpha1": prrfl_alpha1,
                 "prrfl_alpha2": prrfl_alpha2}
        if algorithm == "prrfl":
            if not os.path.isfile(os.path.join(bundle_dir, PRRFL_CONFIG)):
                raise FileNotFoundError(f"{bundle_dir} has no {PRRFL_CONFIG}")
            if privacy_percentile is not None:
                raise ValueError("PRR-FL's server needs each site's full deputy (Fourier aggregation is not a "
                                 "mean of differences); drop privacy_percentile")
            if initial_model is not None:
                raise ValueError("a PRR-FL job cannot resume from a server checkpoint: it holds mean amplitudes, "
                                 "and the personalized models live in the sites' run folders of the old job")
            r0, r1 = fourier_aggregation.check_schedule(
                fourier_aggregation.DEFAULT_R0 if prrfl_r0 is None else prrfl_r0,
                fourier_aggregation.DEFAULT_R1 if prrfl_r1 is None else prrfl_r1)
            deputy.check_alphas(deputy.DEFAULT_ALPHA1 if prrfl_alpha1 is None else prrfl_alpha1,
                                deputy.DEFAULT_ALPHA2 if prrfl_alpha2 is None else prrfl_alpha2)
            config_files.append(PRRFL_CONFIG)
            overrides.update({k: v for k, v in (("prrfl_alpha1", prrfl_alpha1), ("prrfl_alpha2", prrfl_alpha2))
                              if v is not None})
        elif any(v is not None for v in prrfl.values()) or prrfl_weighted:
            raise ValueError(f"{sorted(k for k, v in prrfl.items() if v is not None) or ['prrfl_weighted']} "
                             f"are PRR-FL settings; algorithm is {algorithm!r}")
        _check_override_ids(bundle_dir, config_files, overrides)
        key_metric = bundle_key_metric(bundle_dir, config_files)
        bundle_name = os.path.basename(os.path.normpath(bundle_dir))
        if ship_code:  # the job's own copy of the bundle, inside each app
            bundle_args = {"bundle_root": f"config/{bundle_name}"}
        else:  # the participants' installed bundle, named and pinned
            if data_root:
                raise ValueError("data_root with ship_code=False: sites that run no job code take their data folder "
                                 "only from their own configuration (FEDHARMONY_DATASET_DIR / FEDHARMONY_DATA_ROOT)")
            job_policy.validate_overrides(overrides, job_policy.load_tunables(bundle_dir))
            bundle_args = {"bundle_name": bundle_name, "bundle_version": job_policy.bundle_version(bundle_dir),
                           "bundle_digest": job_policy.bundle_digest(bundle_dir)}
        local_keys = NORM_LAYER_KEYS if algorithm in ("fedbn", "prrfl") else ""
        self.algorithm = algorithm

        job = FedJob(name=name or f"{bundle_name}_{algorithm}", min_clients=min_clients)
        job.set_app_packages(["fedharmony"])  # shipped whole below, not file by file

        # server
        persistor = BundleModelPersistor(config_file=config_files, overrides=overrides,
                                         source_ckpt_file_full_name=initial_model, **bundle_args)
        job.to_server(persistor, id="persistor")
        if algorithm == "prrfl":
            aggregator = FourierAggregator(num_rounds=start_round + num_rounds, r0=r0, r1=r1, local_keys=local_keys,
                                           persistor_id="persistor", weigh_by_samples=prrfl_weighted)
        else:
            aggregator = SiteUpdateAggregator(local_keys=local_keys, persistor_id="persistor")
        # num_clients=0: every round goes to all connected sites (a number would sample that many)
        job.to_server(FedAvg(num_clients=0, num_rounds=num_rounds, start_round=start_round, persistor_id="persistor",
                             aggregator=aggregator, fedprox_mu=mu if algorithm == "fedprox" else None,
                             memory_gc_rounds=memory_gc_rounds),
                      id="fedavg")
        if cross_site_eval:
            # PRR-FL has no global model (its server checkpoint holds mean amplitudes): only the sites' models
            locator = ""
            if algorithm != "prrfl":
                locator = "model_locator"
                job.to_server(PTFileModelLocator(pt_persistor_id="persistor"), id=locator)
            timeouts = {} if cross_site_timeout is None else {"submit_model_timeout": int(cross_site_timeout),
                                                               "validation_timeout": int(cross_site_timeout)}
            job.to_server(CrossSiteModelEval(model_locator_id=locator, **timeouts), id="cross_site_eval")
            job.to_server(ValidationJsonGenerator(), id="json_generator")
        if algorithm == "iopfl":
            job.to_server(ModelPoolWriter(persistor_id="persistor", config_files=config_files, overrides=overrides),
                          id="model_pool_writer")
        job.to_server(TBAnalyticsReceiver(events=["fed.analytix_log_stats"]), id="tb_receiver")
        job.to_server(RoundSummaryWriter(tag=key_metric, model="personalized model" if algorithm == "prrfl"
                                         else "global model"), id="round_summary")
        job.to_server(SiteErrorLogger(), id="site_errors")
        job.to_server({"server": {"task_request_interval": task_request_interval}})

        # sites
        executor = BundleExecutor(config_files=config_files, data_root=data_root, **bundle_args,
                                  local_epochs=local_epochs, local_keys=local_keys, overrides=overrides,
                                  num_threads=num_threads, personalize_alpha=iop_alpha,
                                  send_weight_diff=privacy_percentile is not None,
                                  score_after_training=score_after_training)
        job.to_clients(executor, tasks=["train", "validate", "submit_model"])
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
            for add in (job.add_file_to_server, job.add_file_to_clients):
                add(PACKAGE_DIR, dest_dir="fedharmony", app_folder_type="custom")
                add(os.path.abspath(bundle_dir), dest_dir=bundle_name, app_folder_type="config")
        super().__init__(job)


def _check_harmofl(amp_mode=None, amp_ratio=None, wp_alpha=None, image_size=None):
    """Refuse bad HarmoFL settings when the job is built, not on the sites."""
    from ..networks import MODES
    from ..perturbation import check_alpha

    if amp_mode is not None and amp_mode not in MODES:
        raise ValueError(f"amp_mode must be one of {MODES}, got {amp_mode!r}")
    if amp_ratio is not None and not 0.0 <= amp_ratio <= 0.5:
        raise ValueError(f"amp_ratio (L) must be in [0, 0.5], got {amp_ratio}")
    if wp_alpha is not None:
        check_alpha(wp_alpha)
    if image_size is not None and (image_size < 16 or image_size % 16):
        raise ValueError(f"image_size must be a positive multiple of 16, got {image_size}")


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


def bundle_key_metric(bundle_dir: str, config_files) -> str:
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
