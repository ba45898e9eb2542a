"""IOP-FL's server: FedAvg's mean, and the model pool (global + personalized models) written at the end."""

import json
import os
from typing import Optional

from nvflare.apis.dxo import from_file
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_component import FLComponent
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.abstract.model import ModelLearnableKey
from nvflare.app_common.app_constant import AppConstants

from fedharmony.bundle import job_policy
from fedharmony.fl.fingerprint import RESULT_FILE as FINGERPRINT_RESULT
from fedharmony.fl.recipe import BundleRecipe
from fedharmony.methods.iopfl.model_pool import write_pool


class ModelPoolWriter(FLComponent):
    """At END_RUN, write ``<run dir>/<out_folder>/`` (see :mod:`fedharmony.methods.iopfl.model_pool`).

    The global model is the persistor's last one; the sites' models are those they
    submitted to cross-site evaluation (for IOP-FL: each site's personalized model, the
    best on its own validation split), which ``CrossSiteModelEval`` keeps in
    ``cross_site_val/model_shareables/``. The pool lands in the server's run folder, so
    it comes back with the job's results (simulator workspace, ``nvflare job download``).

    Args:
        persistor_id: the persistor holding the global model.
        config_files, overrides: how the bundle's network was built (go in the manifest).
        out_folder: pool folder name under the run directory.
    """

    def __init__(self, persistor_id: str = "persistor", config_files: Optional[list] = None,
                 overrides: Optional[dict] = None, out_folder: str = "model_pool",
                 global_model_file: str = "FL_global_model.pt"):
        super().__init__()
        self.persistor_id = persistor_id
        self.config_files = config_files or ["configs/train.json"]
        self.overrides = overrides or {}
        self.out_folder = out_folder
        self.global_model_file = global_model_file

    def handle_event(self, event_type: str, fl_ctx: FLContext):
        if event_type != EventType.END_RUN:
            return
        try:
            self._write(fl_ctx)
        except Exception as e:  # the job's results are already saved; a pool failure must not hide them
            self.log_error(fl_ctx, f"model pool not written: {type(e).__name__}: {e}")

    def _write(self, fl_ctx: FLContext):
        run_dir = fl_ctx.get_engine().get_workspace().get_run_dir(fl_ctx.get_job_id())
        models_dir = os.path.join(run_dir, AppConstants.CROSS_VAL_DIR, AppConstants.CROSS_VAL_MODEL_DIR_NAME)
        personalized, info = {}, {}
        sites = {c.name for c in fl_ctx.get_engine().get_clients()}
        if os.path.isdir(models_dir):  # also holds the server's models (SRV_...): keep the sites' only
            for name in sorted(n for n in os.listdir(models_dir) if n in sites):
                dxo = from_file(os.path.join(models_dir, name))
                personalized[name] = dxo.data
                meta = dxo.meta or {}
                info[name] = {k: meta[k] for k in ("data", "best_round", "best_metric") if k in meta}
        if not personalized:
            self.log_warning(fl_ctx, f"no site models in {models_dir} (cross-site evaluation off or failed): "
                                     "no model pool written")
            return
        persistor = fl_ctx.get_engine().get_component(self.persistor_id)
        learnable = persistor.get_model(self.global_model_file, fl_ctx)
        if learnable is None:
            self.log_warning(fl_ctx, f"persistor has no {self.global_model_file}: no model pool written")
            return
        overrides = dict(self.overrides)
        planned = os.path.join(run_dir, FINGERPRINT_RESULT)
        if os.path.isfile(planned):  # --fingerprint: the sites trained at the planned spacing; routing must too
            with open(planned) as f:
                overrides.update(json.load(f)["settings"])
        manifest = write_pool(os.path.join(run_dir, self.out_folder), learnable[ModelLearnableKey.WEIGHTS],
                              personalized, self.config_files, overrides, info,
                              job={"job_id": fl_ctx.get_job_id()})
        self.log_info(fl_ctx, f"model pool: global + {len(personalized)} site models written, manifest {manifest}")
        evaluated = sorted(k for k, v in self.overrides.items() if not job_policy.is_plain_value(v))
        if evaluated:  # a code-shipping job may use them; a site loading the pool will not
            self.log_warning(fl_ctx, f"model pool: overrides {evaluated} are MONAI expressions or nested configs; a "
                                     f"site that loads this pool refuses them (a pool is data, not code)")


class IOPFLRecipe(BundleRecipe):
    """IOP-FL. Keyword-only: ``iop_alpha`` (the personalization weight a in [0, 1), default 0.1,
    the released value; ``fedharmony.methods.iopfl.SPEC``), then every
    :class:`~fedharmony.fl.recipe.BundleRecipe` setting.
    Cross-site evaluation stays on: it is how the server collects the personalized models."""

    method = "iopfl"

    def check(self):
        if not self.cross_site_eval:
            raise ValueError("iopfl collects the model pool through cross-site evaluation; keep it on")

    def add_server_components(self, job):
        job.to_server(ModelPoolWriter(persistor_id="persistor", config_files=self.config_files,
                                      overrides=self.overrides), id="model_pool_writer")
