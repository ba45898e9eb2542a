"""IOP-FL's server: FedAvg's mean, and the model pool (global + personalized models) written at the end."""

from typing import Optional

from fedharmony.fl.pool import ModelPoolWriter
from fedharmony.fl.recipe import BundleRecipe
from fedharmony.methods.iopfl.personalization import check_personalization_alpha
from fedharmony.methods.iopfl.site import DEFAULT_ALPHA


class IOPFLRecipe(BundleRecipe):
    """IOP-FL. Keyword-only: ``iop_alpha`` (the personalization weight a in [0, 1), default 0.1,
    the released value), then every :class:`~fedharmony.fl.recipe.BundleRecipe` setting.
    Cross-site evaluation stays on: it is how the server collects the personalized models."""

    method = "iopfl"

    def __init__(self, *, iop_alpha: Optional[float] = None, **kwargs):
        self.iop_alpha = check_personalization_alpha(DEFAULT_ALPHA if iop_alpha is None else iop_alpha)
        super().__init__(**kwargs)

    def check(self):
        if not self.cross_site_eval:
            raise ValueError("iopfl collects the model pool through cross-site evaluation; keep it on")

    def site_settings(self):
        return {"alpha": self.iop_alpha}

    def add_server_components(self, job):
        job.to_server(ModelPoolWriter(persistor_id="persistor", config_files=self.config_files,
                                      overrides=self.overrides), id="model_pool_writer")


Recipe = IOPFLRecipe  # the name the registry looks up
