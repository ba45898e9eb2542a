"""Server widget that turns the sites' tracked metrics into a CSV, a JSON summary and a plot."""

import os
from typing import List, Optional

from nvflare.apis.analytix import AnalyticsData
from nvflare.apis.dxo import from_shareable
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.widgets.streaming import AnalyticsReceiver

from fedharmony.core.results import write_round_metrics

ROUND_MARK = "[round]"  # the job scripts show the lines that carry it


class RoundSummaryWriter(AnalyticsReceiver):
    """Collects every scalar the sites track (the same stream TensorBoard gets) and, at the
    end of the run, writes ``<run dir>/<out_folder>/metrics_by_round.csv``, ``summary.json``
    and ``<tag>_by_round.png``. Also rewrites them once a round's ``tag`` has arrived from
    every site seen so far, so a long run can be followed (and little is lost if the server
    dies) without redrawing the plot on every message.

    Once a round's ``tag`` has arrived from every connected site it logs one line,
    ``[round] 5: site-1=0.5659 site-2=0.6312 ... mean=0.4993 (val_mean_dice, global model)``, that the job scripts show on the
    terminal (:mod:`fedharmony.fl.cli`) while NVFlare's own log goes to a file.
    """

    def __init__(self, out_folder: str = "results", tag: str = "val_mean_dice", events: Optional[List[str]] = None,
                 model: str = "global model"):
        super().__init__(events=events or ["fed.analytix_log_stats"])
        self.model = model
        self.out_folder = out_folder
        self.tag = tag
        self.records: List[dict] = []
        self.out_dir = None

    def initialize(self, fl_ctx: FLContext):
        run_dir = fl_ctx.get_engine().get_workspace().get_run_dir(fl_ctx.get_job_id())
        self.out_dir = os.path.join(run_dir, self.out_folder)

    def save(self, fl_ctx: FLContext, shareable: Shareable, record_origin: str):
        data = AnalyticsData.from_dxo(from_shareable(shareable))
        if data is None or not isinstance(data.value, (int, float)):
            return
        self.records.append({"site": record_origin, "tag": data.tag, "round": data.step, "value": float(data.value)})
        if data.tag == self.tag:
            tagged = [r for r in self.records if r["tag"] == self.tag]
            sites = {r["site"] for r in tagged}
            this_round = {r["site"]: r["value"] for r in tagged if r["round"] == data.step}
            if len(this_round) == len(sites):
                write_round_metrics(self.records, self.out_dir, self.tag, self.model)
            connected = len(fl_ctx.get_engine().get_clients())
            if len(this_round) == max(connected, len(sites)):
                scores = " ".join(f"{s}={v:.4f}" for s, v in sorted(this_round.items()))
                mean = sum(this_round.values()) / len(this_round)
                self.log_info(fl_ctx, f"{ROUND_MARK} {data.step}: {scores} mean={mean:.4f} ({self.tag}, {self.model})")

    def finalize(self, fl_ctx: FLContext):
        if self.records:
            paths = write_round_metrics(self.records, self.out_dir, self.tag, self.model)
            self.log_info(fl_ctx, f"round metrics written: {', '.join(str(p) for p in paths.values())}")
