"""The federation plans its preprocessing from the sites' data fingerprints before round 1 (NVFlare glue; the math
is :mod:`fedharmony.data.fingerprint`).

:class:`FingerprintController` is a server workflow that runs before training:

1. it sends every site the task ``fingerprint``; a site answers with its training scans' header numbers (how many
   scans have each in-plane spacing, slice spacing, matrix and field of view: no voxel, no patient datum);
2. it checks each answer as data (:func:`fedharmony.data.fingerprint.check_fingerprint`; a malformed one is named
   and left out), combines them (:func:`~fedharmony.data.fingerprint.combine_fingerprints`: the median in-plane
   spacing, a crop holding the median field of view), logs what it chose and why, names every site whose scans
   are unlike the rest, and writes ``fingerprint.json`` (the choice, its reasons, each site's medians) into the
   server's run folder, beside the global model;
3. it sends every site the task ``set_preprocessing`` with the two bundle settings (``pixdim``, ``image_size``);
   a site checks them as it checks any job override and builds its bundle with them. A site that does not take
   them stops the job (it would train on other inputs than the rest).

Then the training workflow starts as usual. A setting the job gives by hand (``--override '{"pixdim": ...}'``)
is not overridden: the job builder refuses ``--fingerprint`` together with a hand-set ``pixdim`` or
``image_size``.
"""

import json
import os
from typing import Dict, Optional

from nvflare.apis.client import Client
from nvflare.apis.controller_spec import ClientTask, Task
from nvflare.apis.dxo import DXO, DataKind, from_shareable
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.impl.controller import Controller
from nvflare.apis.shareable import Shareable
from nvflare.apis.signal import Signal

from fedharmony.bundle.trained_geometry import check_geometry
from fedharmony.data.fingerprint import check_fingerprint, combine_fingerprints

FINGERPRINT_TASK = "fingerprint"
PREPROCESSING_TASK = "set_preprocessing"
PREPROCESSING_KEYS = ("pixdim", "image_size")
RESULT_FILE = "fingerprint.json"


class FingerprintController(Controller):
    """Collects the sites' fingerprints, chooses ``pixdim`` and ``image_size``, and sends them to every site.

    Args:
        max_image_size: the largest crop (a multiple of 16); a larger one keeps the median field of view with
            coarser pixels. None: no cap.
        task_timeout: seconds to wait for the sites' answers (0: no limit).
        persistor_id: the global model's persistor; a job that resumes from a checkpoint recording another
            geometry than the one planned is stopped before round 1.
    """

    def __init__(self, max_image_size: Optional[int] = None, task_timeout: int = 600,
                 persistor_id: str = "persistor"):
        super().__init__()
        if max_image_size is not None and (max_image_size < 16 or max_image_size % 16):
            raise ValueError(f"max_image_size must be a positive multiple of 16, got {max_image_size}")
        self.max_image_size = max_image_size
        self.task_timeout = task_timeout
        self.persistor_id = persistor_id
        self._fingerprints: Dict[str, dict] = {}

    def start_controller(self, fl_ctx: FLContext):
        self._fingerprints = {}

    def stop_controller(self, fl_ctx: FLContext):
        pass

    def process_result_of_unknown_task(self, client: Client, task_name: str, client_task_id: str, result: Shareable,
                                       fl_ctx: FLContext):
        self.log_warning(fl_ctx, f"{client.name}: a result for unknown task {task_name!r} ignored")

    def _received(self, client_task: ClientTask, fl_ctx: FLContext):
        site, result = client_task.client.name, client_task.result
        if result.get_return_code() != ReturnCode.OK:
            self.log_error(fl_ctx, f"{site}: no fingerprint ({result.get_return_code()}); left out")
            return
        try:
            self._fingerprints[site] = check_fingerprint(from_shareable(result).data, site)
        except Exception as e:  # what a site sends is data to check, never to trust
            self.log_error(fl_ctx, f"{site}: fingerprint refused: {e}")

    def control_flow(self, abort_signal: Signal, fl_ctx: FLContext):
        self.broadcast_and_wait(Task(FINGERPRINT_TASK, Shareable(), timeout=self.task_timeout,
                                     result_received_cb=self._received),
                                min_responses=0, fl_ctx=fl_ctx, abort_signal=abort_signal)
        if abort_signal.triggered:
            return
        if not self._fingerprints:
            self.system_panic("no site sent a usable fingerprint: the preprocessing cannot be planned", fl_ctx)
            return
        sites = sorted(self._fingerprints)
        choice = combine_fingerprints([self._fingerprints[s] for s in sites], sites, self.max_image_size)
        for line in choice["why"]:
            self.log_info(fl_ctx, f"fingerprint: {line}")
        for line in choice["outliers"]:
            self.log_warning(fl_ctx, f"fingerprint: a site unlike the rest: {line}")
        resumed = getattr(fl_ctx.get_engine().get_component(self.persistor_id), "initial_geometry", None)
        if resumed and resumed != check_geometry(choice["settings"], "the fingerprint's choice"):
            self.system_panic(f"fingerprint: the model this job resumes from was trained at {resumed}; the sites' "
                              f"fingerprints plan {choice['settings']}: the job stops rather than train it on "
                              f"other inputs (resume without --fingerprint, with the checkpoint's values)", fl_ctx)
            return
        run_dir = fl_ctx.get_engine().get_workspace().get_run_dir(fl_ctx.get_job_id())
        with open(os.path.join(run_dir, RESULT_FILE), "w") as f:
            json.dump({**choice, "fingerprints": self._fingerprints}, f, indent=2)
        settings = DXO(DataKind.COLLECTION, data=dict(choice["settings"])).to_shareable()
        applied = set()

        def took_it(client_task: ClientTask, fl_ctx: FLContext):
            if client_task.result.get_return_code() == ReturnCode.OK:
                applied.add(client_task.client.name)

        self.broadcast_and_wait(Task(PREPROCESSING_TASK, settings, timeout=self.task_timeout,
                                     result_received_cb=took_it),
                                min_responses=0, fl_ctx=fl_ctx, abort_signal=abort_signal)
        missing = sorted({c.name for c in fl_ctx.get_engine().get_clients()} - applied)
        if missing:  # a site that trains at another spacing would join the federation with other inputs
            self.system_panic(f"fingerprint: {missing} did not take the planned preprocessing "
                              f"{choice['settings']}: the job stops rather than train on different inputs", fl_ctx)
            return
        self.log_info(fl_ctx, f"fingerprint: every site builds its bundle with {choice['settings']}")
