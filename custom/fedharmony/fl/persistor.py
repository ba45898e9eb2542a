"""Server model persistor whose network comes from the bundle's ``network_def``."""

import json
import os
from typing import Optional

import numpy as np
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.abstract.model import ModelLearnable, ModelLearnableKey
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.app_event_type import AppEventType
from nvflare.app_opt.pt.file_model_persistor import PTFileModelPersistor

from fedharmony.bundle.networks import build_network, bundle_parser
from fedharmony.bundle.trained_geometry import META_KEY as GEOMETRY_META_KEY
from fedharmony.bundle.trained_geometry import check_geometry, config_geometry, read_trained_geometry
from fedharmony.bundle.job_policy import PolicyError
from fedharmony.fl.policy import resolve_job_bundle


class BundleModelPersistor(PTFileModelPersistor):
    """``PTFileModelPersistor`` that builds its ``nn.Module`` from a MONAI bundle shipped in the job.

    The network is defined once, in the bundle; the server reads it at START_RUN from the
    job's copy (``<app root>/<bundle_root>``) when the job carries code, else from its own
    installed bundle ``bundle_name``, checked against ``bundle_version`` / ``bundle_digest``,
    with the overrides taken only as plain values of tunable ids (``fedharmony.fl.policy``).
    Checkpoints are NVFlare's (``FL_global_model.pt`` every round, ``best_FL_global_model.pt``). Each records the
    geometry the sites trained at (``meta_props.preprocessing``: ``pixdim``, ``image_size`` and their source, the
    federation's fingerprint when the job planned one, else the bundle config), so the bundle's inference resamples
    as they did (:mod:`fedharmony.bundle.trained_geometry`).

    Args:
        bundle_root: the job's bundle copy, relative to the server app's root (jobs that carry code).
        bundle_name, bundle_version, bundle_digest: the installed bundle a job without code runs.
        config_file: bundle config (or list of configs, layered) holding ``network_def_key``.
        network_def_key: config id of the network.
        overrides: the bundle overrides the sites use (same architecture on both sides).
        seed: seed of the initial global weights.
        source_ckpt_file_full_name: optional checkpoint to start from. When it records the geometry it was
            trained at, the job must train at the same: the server stops at the start otherwise (or, with
            ``planned_geometry``, when the fingerprint plans other values: :mod:`fedharmony.fl.fingerprint`).
        planned_geometry: the job plans ``pixdim`` / ``image_size`` from the sites' fingerprints before round 1.
    """

    def __init__(self, bundle_root: str = "", config_file="configs/train.json",
                 network_def_key: str = "network_def", overrides: Optional[dict] = None, seed: int = 0,
                 source_ckpt_file_full_name=None, bundle_name: str = "", bundle_version: str = "",
                 bundle_digest: str = "", planned_geometry: bool = False):
        super().__init__(model=None, source_ckpt_file_full_name=source_ckpt_file_full_name)
        self.bundle_root = bundle_root
        self.bundle_name = bundle_name
        self.bundle_version = bundle_version
        self.bundle_digest = bundle_digest
        self.config_file = config_file
        self.network_def_key = network_def_key
        self.overrides = overrides or {}
        self.seed = seed
        self.planned_geometry = planned_geometry
        self._config_geometry: Optional[dict] = None
        self.initial_geometry: Optional[dict] = None  # what the checkpoint resumed from was trained at

    def handle_event(self, event: str, fl_ctx: FLContext):
        if event == EventType.START_RUN and self.model is None:
            try:
                bundle = resolve_job_bundle(fl_ctx, bundle_root=self.bundle_root, bundle_name=self.bundle_name,
                                            bundle_version=self.bundle_version, bundle_digest=self.bundle_digest,
                                            config_files=self.config_file, overrides=self.overrides)
            except PolicyError as e:
                self.system_panic(f"job refused by the server's policy: {e}", fl_ctx)
                return
            try:
                self.model = build_network(bundle.root, bundle.config_files, self.network_def_key, bundle.overrides,
                                           self.seed)
            except Exception as e:
                self.system_panic(f"cannot build the bundle network from {bundle.root}: {e}", fl_ctx)
                return
            try:
                self._config_geometry = config_geometry(bundle_parser(bundle.root, bundle.config_files,
                                                                      bundle.overrides))
            except Exception as e:  # the network built, so the config reads; a geometry it cannot give is not fatal
                self.log_warning(fl_ctx, f"the bundle's pixdim / image_size did not resolve ({e}): checkpoints "
                                         f"will not record the training geometry")
            if not self._check_initial_geometry(fl_ctx):
                return
            self.log_info(fl_ctx, f"global model: {type(self.model).__name__} from {bundle.root} "
                                  f"{bundle.config_files} ({'job copy' if bundle.trusted else 'installed'}), "
                                  f"{sum(p.numel() for p in self.model.parameters())} parameters")
        if event == AppEventType.GLOBAL_BEST_MODEL_AVAILABLE:
            # NVFlare's handler saves the context's global model with all its meta; ours cuts the meta first, as
            # save_model does, so best_FL_global_model.pt loads with weights_only=True too
            learnable = fl_ctx.get_prop(AppConstants.GLOBAL_MODEL)
            if learnable:
                self._get_persistence_manager(fl_ctx).update(_checkpointable(learnable, self._geometry(fl_ctx)))
            self.save_model_file(self._best_ckpt_save_path)
            return
        super().handle_event(event, fl_ctx)

    def save_model(self, model_learnable, fl_ctx: FLContext):
        """NVFlare's save, with the checkpoint's meta cut to what ``torch.load(weights_only=True)`` reads:
        per-round arrays a method sends with the global model (SCAFFOLD's control variate) stay out."""
        super().save_model(_checkpointable(model_learnable, self._geometry(fl_ctx)), fl_ctx)

    def _check_initial_geometry(self, fl_ctx: FLContext) -> bool:
        """A resumed job trains at the geometry its checkpoint was trained at (False: the job is stopped)."""
        path = self.source_ckpt_file_full_name
        if not path or not os.path.isabs(path) or not os.path.isfile(path):
            return True  # NVFlare's loader names a missing checkpoint
        try:
            recorded = read_trained_geometry(path)
        except ValueError as e:
            self.system_panic(f"--initial-model: {e}", fl_ctx)
            return False
        if recorded is None:
            return True
        source = recorded.pop("source", "")
        self.initial_geometry = recorded
        if self.planned_geometry:
            self.log_info(fl_ctx, f"resuming from a model trained at {recorded} ({source}); the fingerprint's plan "
                                  f"must match it")
            return True
        if self._config_geometry is not None and self._config_geometry != recorded:
            self.system_panic(f"--initial-model {path} was trained at pixdim {recorded['pixdim']:g}, image_size "
                              f"{recorded['image_size']} ({source}); this job trains at pixdim "
                              f"{self._config_geometry['pixdim']:g}, image_size {self._config_geometry['image_size']}: "
                              f"give the job the checkpoint's values (--override)", fl_ctx)
            return False
        return True

    def _geometry(self, fl_ctx: FLContext) -> Optional[dict]:
        """The geometry the sites train at: the federation's fingerprint choice (``fingerprint.json`` in the run
        folder, written before round 1) when the job planned one, else the bundle config's; None when neither."""
        from fedharmony.fl.fingerprint import RESULT_FILE

        run_dir = fl_ctx.get_engine().get_workspace().get_run_dir(fl_ctx.get_job_id())
        planned = os.path.join(run_dir, RESULT_FILE)
        if os.path.isfile(planned):
            try:
                with open(planned) as f:
                    settings = json.load(f)["settings"]
                return {**check_geometry(settings, planned), "source": "fingerprint"}
            except (OSError, ValueError, KeyError, TypeError) as e:
                self.log_error(fl_ctx, f"{planned} unreadable ({e}): the checkpoint records no training geometry")
                return None
        if self._config_geometry is None:
            return None
        return {**self._config_geometry, "source": "bundle config"}


def _checkpointable(model_learnable, geometry: Optional[dict] = None):
    """``model_learnable`` with its meta cut by :func:`checkpoint_meta` and, given one, the training ``geometry``
    added to it (the same object when nothing changes)."""
    meta = model_learnable.get(ModelLearnableKey.META) or {}
    kept = checkpoint_meta(meta)
    if geometry is not None:
        kept[GEOMETRY_META_KEY] = dict(geometry)
    elif len(kept) == len(meta):
        return model_learnable
    return ModelLearnable({**model_learnable, ModelLearnableKey.META: kept})


def checkpoint_meta(meta: dict) -> dict:
    """The entries of a global model's meta that go into its checkpoint: those holding no NumPy array."""
    return {k: v for k, v in meta.items() if not _holds_arrays(v)}


def _holds_arrays(value) -> bool:
    if isinstance(value, dict):
        return any(_holds_arrays(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_holds_arrays(v) for v in value)
    return isinstance(value, np.ndarray)
