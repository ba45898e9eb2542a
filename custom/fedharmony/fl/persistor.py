"""Server model persistor whose network comes from the bundle's ``network_def``."""

from typing import Optional

import numpy as np
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.abstract.model import ModelLearnable, ModelLearnableKey
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.app_event_type import AppEventType
from nvflare.app_opt.pt.file_model_persistor import PTFileModelPersistor

from fedharmony.bundle.networks import build_network
from fedharmony.bundle.job_policy import PolicyError
from fedharmony.fl.policy import resolve_job_bundle


class BundleModelPersistor(PTFileModelPersistor):
    """``PTFileModelPersistor`` that builds its ``nn.Module`` from a MONAI bundle shipped in the job.

    The network is defined once, in the bundle; the server reads it at START_RUN from the
    job's copy (``<app root>/<bundle_root>``) when the job carries code, else from its own
    installed bundle ``bundle_name``, checked against ``bundle_version`` / ``bundle_digest``,
    with the overrides taken only as plain values of tunable ids (``fedharmony.fl.policy``).
    Checkpoints are NVFlare's (``FL_global_model.pt`` every round, ``best_FL_global_model.pt``).

    Args:
        bundle_root: the job's bundle copy, relative to the server app's root (jobs that carry code).
        bundle_name, bundle_version, bundle_digest: the installed bundle a job without code runs.
        config_file: bundle config (or list of configs, layered) holding ``network_def_key``.
        network_def_key: config id of the network.
        overrides: the bundle overrides the sites use (same architecture on both sides).
        seed: seed of the initial global weights.
        source_ckpt_file_full_name: optional checkpoint to start from.
    """

    def __init__(self, bundle_root: str = "", config_file="configs/train.json",
                 network_def_key: str = "network_def", overrides: Optional[dict] = None, seed: int = 0,
                 source_ckpt_file_full_name=None, bundle_name: str = "", bundle_version: str = "",
                 bundle_digest: str = ""):
        super().__init__(model=None, source_ckpt_file_full_name=source_ckpt_file_full_name)
        self.bundle_root = bundle_root
        self.bundle_name = bundle_name
        self.bundle_version = bundle_version
        self.bundle_digest = bundle_digest
        self.config_file = config_file
        self.network_def_key = network_def_key
        self.overrides = overrides or {}
        self.seed = seed

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
            self.log_info(fl_ctx, f"global model: {type(self.model).__name__} from {bundle.root} "
                                  f"{bundle.config_files} ({'job copy' if bundle.trusted else 'installed'}), "
                                  f"{sum(p.numel() for p in self.model.parameters())} parameters")
        if event == AppEventType.GLOBAL_BEST_MODEL_AVAILABLE:
            # NVFlare's handler saves the context's global model with all its meta; ours cuts the meta first, as
            # save_model does, so best_FL_global_model.pt loads with weights_only=True too
            learnable = fl_ctx.get_prop(AppConstants.GLOBAL_MODEL)
            if learnable:
                self._get_persistence_manager(fl_ctx).update(_checkpointable(learnable))
            self.save_model_file(self._best_ckpt_save_path)
            return
        super().handle_event(event, fl_ctx)

    def save_model(self, model_learnable, fl_ctx: FLContext):
        """NVFlare's save, with the checkpoint's meta cut to what ``torch.load(weights_only=True)`` reads:
        per-round arrays a method sends with the global model (SCAFFOLD's control variate) stay out."""
        super().save_model(_checkpointable(model_learnable), fl_ctx)


def _checkpointable(model_learnable):
    """``model_learnable`` with its meta cut by :func:`checkpoint_meta` (the same object when nothing is cut)."""
    meta = model_learnable.get(ModelLearnableKey.META) or {}
    kept = checkpoint_meta(meta)
    if len(kept) == len(meta):
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
