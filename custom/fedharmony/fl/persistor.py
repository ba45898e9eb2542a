"""Server model persistor whose network comes from the bundle's ``network_def``."""

import os
from typing import Optional

from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import FLContextKey
from nvflare.apis.fl_context import FLContext
from nvflare.app_opt.pt.file_model_persistor import PTFileModelPersistor

from ..bundle_site import build_network


class BundleModelPersistor(PTFileModelPersistor):
    """``PTFileModelPersistor`` that builds its ``nn.Module`` from a MONAI bundle shipped in the job.

    The network is defined once, in the bundle; the server reads it from
    ``<app root>/<bundle_root>/<config_file>`` at START_RUN. Checkpoints are NVFlare's
    (``FL_global_model.pt`` every round, ``best_FL_global_model.pt``).

    Args:
        bundle_root: bundle folder, relative to the server app's root (or absolute).
        config_file: bundle config (or list of configs, layered) holding ``network_def_key``.
        network_def_key: config id of the network.
        overrides: the bundle overrides the sites use (same architecture on both sides).
        seed: seed of the initial global weights.
        source_ckpt_file_full_name: optional checkpoint to start from.
    """

    def __init__(self, bundle_root: str = "config/prostate_mri_seg", config_file="configs/train.json",
                 network_def_key: str = "network_def", overrides: Optional[dict] = None, seed: int = 0,
                 source_ckpt_file_full_name=None):
        super().__init__(model=None, source_ckpt_file_full_name=source_ckpt_file_full_name)
        self.bundle_root = bundle_root
        self.config_file = config_file
        self.network_def_key = network_def_key
        self.overrides = overrides or {}
        self.seed = seed

    def handle_event(self, event: str, fl_ctx: FLContext):
        if event == EventType.START_RUN and self.model is None:
            root = os.path.join(fl_ctx.get_prop(FLContextKey.APP_ROOT) or "", self.bundle_root)
            try:
                self.model = build_network(root, self.config_file, self.network_def_key, self.overrides, self.seed)
            except Exception as e:
                self.system_panic(f"cannot build the bundle network from {root}: {e}", fl_ctx)
                return
            self.log_info(fl_ctx, f"global model: {type(self.model).__name__} from {root} {self.config_file}, "
                                  f"{sum(p.numel() for p in self.model.parameters())} parameters")
        super().handle_event(event, fl_ctx)
