"""Carry a site's error message to the server log (NVFlare itself only shows the server a return code)."""

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
    """

    def __init__(self):
        super().__init__()
        self.errors = []

    def handle_event(self, event_type: str, fl_ctx: FLContext):
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
