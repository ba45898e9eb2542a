"""PRR-FL's server: progressive Fourier aggregation of the deputies, and the recipe that wires it."""

from typing import Dict, List, Tuple

import numpy as np
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType

from fedharmony.core.aggregation import UpdateRejected
from fedharmony.methods.prrfl.deputy import DEFAULT_ALPHA1, DEFAULT_ALPHA2, check_alphas
from fedharmony.fl.aggregator import SiteUpdateAggregator
from fedharmony.fl.recipe import BundleRecipe
from fedharmony.methods.prrfl.fourier_aggregation import (DEFAULT_R0, DEFAULT_R1, check_box, check_schedule,
                                                          mean_amplitudes, ratio_schedule)
from fedharmony.methods.prrfl.site import FOURIER_BOX, FOURIER_RATIO


class FourierAggregator(SiteUpdateAggregator):
    """PRR-FL's progressive Fourier aggregation of the sites' deputies.

    Each round the server computes, per convolution / linear weight, the mean amplitude
    spectrum of the deputies (:func:`fedharmony.methods.prrfl.fourier_aggregation.mean_amplitudes`;
    other shared tensors: the plain mean) and broadcasts it with this round's shared
    ratio ``L_t`` (meta ``prrfl_fourier_ratio``); each site mixes it into its own deputy
    with its own phase (:meth:`fedharmony.methods.prrfl.site.PRRFLSite.receive`). The numbers equal the paper's "each site
    gets its own deputy" form (tested); one broadcast replaces one message per site, and the
    server never needs a site's phase. Norm layers (``local_keys``) stay on the sites.

    The global checkpoint therefore holds mean amplitudes, not a model: under PRR-FL the
    sites' personalized models are the result.

    Args:
        num_rounds: rounds of the schedule, T (the job's start round + rounds).
        r0, r1: the shared ratio grows linearly from ``r0`` (round 0) towards ``r1``.
        weigh_by_samples: weight sites by training-set size (default False: the released
            uniform mean).
        box: the shared low-frequency box, ``symmetric`` (ours) or ``half_open`` (released), sent to
            the sites with the ratio (meta ``prrfl_fourier_box``).
    """

    def __init__(self, num_rounds: int, r0: float = DEFAULT_R0, r1: float = DEFAULT_R1, local_keys: str = "",
                 persistor_id: str = "persistor", weigh_by_samples: bool = False, box: str = "symmetric"):
        super().__init__(local_keys=local_keys, persistor_id=persistor_id, weigh_by_samples=weigh_by_samples)
        self.r0, self.r1 = check_schedule(r0, r1)
        self.box = check_box(box)
        if num_rounds < 1:
            raise ValueError(f"num_rounds must be >= 1, got {num_rounds}")
        self.num_rounds = num_rounds
        self._deputies: Dict[str, Tuple[Dict[str, np.ndarray], float]] = {}

    def accept_model(self, model: FLModel):
        if (model.params_type or ParamsType.FULL) != ParamsType.FULL:
            site = (model.meta or {}).get("client_name", "unknown site")
            self.rejected[site] = f"PRR-FL needs the full deputy weights, got {model.params_type}"
            self.error(f"round {self._round()}: rejected the update from {site}: {self.rejected[site]}")
            return
        super().accept_model(model)

    def _add(self, site: str, weights: Dict[str, np.ndarray], weight: float, meta: dict):
        if site in self._deputies:
            raise UpdateRejected(f"{site} already contributed this round")
        self._deputies[site] = (weights, weight)

    def _contributors(self) -> List[str]:
        return sorted(self._deputies)

    def _aggregate_params(self) -> Tuple[Dict[str, np.ndarray], dict]:
        round_index = self._round() or 0
        ratio = ratio_schedule(round_index, self.num_rounds, self.r0, self.r1)
        sites = self._contributors()
        params = mean_amplitudes([self._deputies[s][0] for s in sites], [self._deputies[s][1] for s in sites], sites)
        self.info(f"round {round_index}: Fourier aggregation of {len(sites)} deputies, shared ratio L = {ratio:.4f}")
        return params, {FOURIER_RATIO: ratio, FOURIER_BOX: self.box}

    def reset_stats(self):
        super().reset_stats()
        self._deputies = {}


class PRRFLRecipe(BundleRecipe):
    """PRR-FL: the bundle's ``configs/prrfl.json`` layered on ``train.json``; the personalized models
    are the result (there is no global model: the server's checkpoint holds mean amplitudes).

    Keyword-only (``fedharmony.methods.prrfl.SPEC``; None keeps the released value), then every
    :class:`~fedharmony.fl.recipe.BundleRecipe` setting:
        prrfl_r0, prrfl_r1: the shared spectral ratio grows from r0 (round 0) towards r1
            (released 0.7, 0.95); both in (0, 1], r0 <= r1.
        prrfl_alpha1, prrfl_alpha2: the stage thresholds (released 0.7, 0.9).
        prrfl_weighted: weight the mean amplitude by training-set size (default: uniform, as released).
        prrfl_box: ``symmetric`` (default) or ``half_open``, the released code's box ``[c - b, c + b)``.

    With ``protocol="released"`` (a :class:`~fedharmony.fl.recipe.BundleRecipe` setting) the server
    shares the half-open box, and the sites distil with the ``batchmean`` KL and train with the
    released optimizer: SGD, lr 1e-2 halved every 5 rounds, built anew each round
    (:attr:`fedharmony.methods.prrfl.site.PRRFLSite.released_settings`, :mod:`fedharmony.bundle.optim`).
    """

    method = "prrfl"
    has_global_model = False  # the server's checkpoint holds mean amplitudes

    def check(self):
        s = self.settings  # each checked against its SPEC already; here what ties two of them together
        self.r0, self.r1 = check_schedule(s["prrfl_r0"], s["prrfl_r1"])
        check_alphas(DEFAULT_ALPHA1 if s["prrfl_alpha1"] is None else s["prrfl_alpha1"],
                     DEFAULT_ALPHA2 if s["prrfl_alpha2"] is None else s["prrfl_alpha2"])
        if self.protocol == "released" and s["prrfl_box"] not in (None, "half_open"):
            raise ValueError(f"protocol 'released' sets prrfl_box='half_open' (given {s['prrfl_box']!r})")
        self.box = "half_open" if self.protocol == "released" else (s["prrfl_box"] or "symmetric")
        if self.privacy_percentile is not None:
            raise ValueError("PRR-FL's server needs each site's full deputy (Fourier aggregation is not a "
                             "mean of differences); drop privacy_percentile")
        if self.initial_model is not None:
            raise ValueError("a PRR-FL job cannot resume from a server checkpoint: it holds mean amplitudes, "
                             "and the personalized models live in the sites' run folders of the old job")

    def aggregator(self):
        return FourierAggregator(num_rounds=self.start_round + self.num_rounds, r0=self.r0, r1=self.r1,
                                 local_keys=self.local_keys, persistor_id="persistor",
                                 weigh_by_samples=self.settings["prrfl_weighted"], box=self.box)

