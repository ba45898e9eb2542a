"""The server aggregator every method starts from: the sample-weighted mean of site updates.

It skips local keys and rejects bad site updates; PRR-FL's and SCAFFOLD's aggregators
(``fedharmony/methods/<name>/server.py``) build on it.
"""

from typing import Dict, List, Tuple

import numpy as np

from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.aggregators.model_aggregator import ModelAggregator
from nvflare.app_common.app_constant import AppConstants

from fedharmony.core.aggregation import UpdateRejected, WeightedAverage, check_update, expected_shapes

NUM_SAMPLES = "num_samples"  # meta key: the site's training cases this round


class SiteUpdateAggregator(ModelAggregator):
    """Weighted mean of site models (FedAvg, FedProx, FedBN, HarmoFL, IOP-FL, Ditto).

    * weight = the site's number of training cases (``num_samples`` in the update's
      meta; NVFlare's ``NUM_STEPS_CURRENT_ROUND`` when a site does not send it);
      ``weigh_by_samples=False`` gives a uniform mean;
    * keys matching ``local_keys`` (a regex, FedBN's norm layers) are never averaged:
      they are dropped from updates and absent from the global model sent back, so each
      site keeps its own;
    * an update whose keys or shapes differ from the model, or that holds NaN/Inf, is
      rejected: the server log names the site and the reason, and the round goes on
      with the others. A round with no acceptable update stops the job;
    * updates are full weights or, when sites send differences (``send_weight_diff``,
      for NVFlare's privacy filters), differences; the mean keeps that kind (NVFlare's
      workflow adds a mean difference to the global model). A round does not mix them.

    The expected keys and shapes come from the persistor's model (``persistor_id``).
    """

    def __init__(self, local_keys: str = "", persistor_id: str = "persistor", weigh_by_samples: bool = True):
        super().__init__()
        self.local_keys = local_keys
        self.persistor_id = persistor_id
        self.weigh_by_samples = weigh_by_samples
        self._expected: Dict[str, tuple] = {}
        self._average = WeightedAverage()
        self._metrics = WeightedAverage()
        self.rejected: Dict[str, str] = {}
        self._params_type = None

    def _expected_shapes(self) -> Dict[str, tuple]:
        # read lazily: the persistor builds its model at START_RUN, which may reach it after us
        if not self._expected:
            persistor = self.fl_ctx.get_engine().get_component(self.persistor_id)
            model = getattr(persistor, "model", None)
            if model is None:
                raise RuntimeError(f"aggregator needs persistor {self.persistor_id!r} with a model")
            self._expected = expected_shapes(model.state_dict(), self.local_keys)
            self.info(f"expecting {len(self._expected)} shared keys per update"
                      + (f" (local keys: /{self.local_keys}/)" if self.local_keys else ""))
        return self._expected

    def _round(self):
        return self.fl_ctx.get_prop(AppConstants.CURRENT_ROUND) if self.fl_ctx else None

    def accept_model(self, model: FLModel):
        site = (model.meta or {}).get("client_name", "unknown site")
        try:
            params_type = model.params_type or ParamsType.FULL
            if params_type not in (ParamsType.FULL, ParamsType.DIFF):
                raise UpdateRejected(f"expected full weights or a difference, got {params_type}")
            if self._params_type not in (None, params_type):
                raise UpdateRejected(f"sent {params_type} while this round's other updates are {self._params_type}")
            weights = check_update(model.params or {}, self._expected_shapes(), self.local_keys)
            meta = model.meta or {}
            weight = float(meta.get(NUM_SAMPLES, meta.get("NUM_STEPS_CURRENT_ROUND", 1))) if self.weigh_by_samples else 1.0
            self._add(site, weights, weight, meta)
            self._params_type = params_type
        except UpdateRejected as e:
            self.rejected[site] = str(e)
            self.error(f"round {self._round()}: rejected the update from {site}: {e}")
            return
        numeric = {k: v for k, v in (model.metrics or {}).items() if isinstance(v, (int, float))}
        if numeric:
            self._metrics.add(site, numeric, weight)
        self.info(f"round {self._round()}: accepted {site} (weight {weight:g})")

    def _add(self, site: str, weights: Dict[str, np.ndarray], weight: float, meta: dict):
        """Take one checked update (raise ``UpdateRejected`` to refuse it, naming why)."""
        self._average.add(site, weights, weight)

    def _contributors(self) -> List[str]:
        return sorted(self._average.contributors)

    def _aggregate_params(self) -> Tuple[Dict[str, np.ndarray], dict]:
        """The round's global parameters and extra meta for the sites."""
        return self._average.result(), {}

    def aggregate_model(self) -> FLModel:
        if not self._contributors():
            raise RuntimeError(f"round {self._round()}: no site update could be aggregated; rejected: {self.rejected}")
        params, meta = self._aggregate_params()
        metrics = {k: float(v) for k, v in self._metrics.result().items()} if self._metrics.contributors else {}
        self.info(f"round {self._round()}: aggregated {self._contributors()}"
                  + (f", rejected {sorted(self.rejected)}" if self.rejected else ""))
        return FLModel(params=params, params_type=self._params_type or ParamsType.FULL, metrics=metrics,
                       meta={"nr_aggregated": len(self._contributors()), "rejected": dict(self.rejected), **meta})

    def reset_stats(self):
        self._params_type = None
        self._average.reset()
        self._metrics.reset()
        self.rejected = {}
