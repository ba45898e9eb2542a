"""A test-only NVFlare task-result filter that spoils one site's training result on purpose.

It sits where a real privacy filter would (``task_result_filters`` of the client app), so the
bad update crosses the real runtime to the server like a broken site's would. Tests copy
this file into an exported job's ``app/custom/`` and name it in ``config_fed_client.json``.
"""

from typing import Dict

import numpy as np
from nvflare.apis.dxo import DXO, DataKind
from nvflare.apis.dxo_filter import DXOFilter
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.app_constant import AppConstants

FAULTS = ("nan", "inf", "shape", "missing")


class SpoilUpdate(DXOFilter):
    """``faults``: ``{"<site>": {"<round>": "nan" | "inf" | "shape" | "missing"}}``.

    nan / inf: one value of the first floating-point array becomes NaN / +Inf;
    shape: the first array loses its last row; missing: the last key is dropped.
    """

    def __init__(self, faults: Dict[str, Dict[str, str]]):
        super().__init__(supported_data_kinds=[DataKind.WEIGHTS], data_kinds_to_filter=[DataKind.WEIGHTS])
        bad = {f for rounds in faults.values() for f in rounds.values()} - set(FAULTS)
        if bad:
            raise ValueError(f"unknown fault(s) {sorted(bad)}; choose from {FAULTS}")
        self.faults = faults

    def process_dxo(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext):
        site = fl_ctx.get_identity_name()
        current_round = shareable.get_header(AppConstants.CURRENT_ROUND)  # the executor's reply carries it
        fault = self.faults.get(site, {}).get(str(current_round))
        if not fault:
            return None
        weights = dxo.data
        first = next(k for k, v in weights.items() if np.issubdtype(np.asarray(v).dtype, np.floating))
        if fault in ("nan", "inf"):
            spoiled = np.array(weights[first], dtype=np.float32, copy=True)
            spoiled.flat[0] = np.nan if fault == "nan" else np.inf
            weights[first] = spoiled
        elif fault == "shape":
            weights[first] = np.asarray(weights[first])[:-1]
        else:
            weights.pop(list(weights)[-1])
        self.log_warning(fl_ctx, f"fault injection: {site} sends a {fault!r} update in round {current_round}")
        return dxo
