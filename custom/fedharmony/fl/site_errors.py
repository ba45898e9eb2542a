"""Carry a site's error message to the server log (NVFlare itself only shows the server a return code),
and say in plain words when a site drops out of the job."""

from nvflare.apis.event_type import EventType
from nvflare.apis.fl_component import FLComponent
from nvflare.apis.fl_constant import FLContextKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable

ERROR_HEADER = "error"  # reply header the site's executor fills when a task fails


class SiteErrorLogger(FLComponent):
    """Server widget: for every failed task result that carries an ``error`` header, logs
    ``<site>: task <task> failed: <message>`` at ERROR level.

    It runs on ``BEFORE_PROCESS_SUBMISSION``, in the same call that hands the result to the
    workflow, so the message is logged before the workflow can stop the job because of it.

    When NVFlare deems a site disconnected (its heartbeats stopped, then the dead-site grace
    period passed) it logs ``site <site> is gone from the job: ...`` with the sites left
    and the job's minimum; a site that comes back is logged too.
    """

    def __init__(self):
        super().__init__()
        self.errors = []

    def handle_event(self, event_type: str, fl_ctx: FLContext):
        if event_type in (EventType.CLIENT_DISCONNECTED, EventType.CLIENT_RECONNECTED):
            self._log_membership(event_type, fl_ctx)
            return
        if event_type != EventType.BEFORE_PROCESS_SUBMISSION:
            return
        result = fl_ctx.get_prop(FLContextKey.TASK_RESULT)
        if not isinstance(result, Shareable) or result.get_return_code(ReturnCode.OK) == ReturnCode.OK:
            return
        message = result.get_header(ERROR_HEADER)
        if not message:
            return
        peer = fl_ctx.get_peer_context()
        site = peer.get_identity_name() if peer else "unknown site"
        task = fl_ctx.get_prop(FLContextKey.TASK_NAME)
        self.errors.append((site, task, message))
        self.log_error(fl_ctx, f"{site}: task {task!r} failed: {message}", fire_event=False)

    def _log_membership(self, event_type: str, fl_ctx: FLContext):
        if event_type == EventType.CLIENT_RECONNECTED:
            site = fl_ctx.get_prop(FLContextKey.RECONNECTED_CLIENT_NAME)
            self.log_info(fl_ctx, f"site {site} is back in the job", fire_event=False)
            return
        site = fl_ctx.get_prop(FLContextKey.DISCONNECTED_CLIENT_NAME)
        meta = fl_ctx.get_prop(FLContextKey.JOB_META) or {}
        minimum = meta.get("min_clients", "?")
        self.log_error(fl_ctx, f"site {site} is gone from the job (no heartbeat): its open tasks end without it, "
                               f"the rounds go on with the other sites while at least {minimum} (the job's "
                               f"min_clients) remain", fire_event=False)
