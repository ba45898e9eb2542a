"""Carry a site's error message to the server log (NVFlare only sends the server a return code)."""

from nvflare.apis.fl_component import FLComponent
from nvflare.apis.fl_constant import FLContextKey, ReservedKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable

SITE_ERROR_EVENT = "fedharmony.site_error"  # a federation event: fired on a site, delivered to the server


def report_site_error(component: FLComponent, fl_ctx: FLContext, task: str, message: str):
    """Site side: send ``message`` (e.g. "SiteDataError: ... Case03.nii.gz is not a readable NIfTI") to the server."""
    data = Shareable()
    data["task"], data["error"] = task, message
    component.fire_fed_event(SITE_ERROR_EVENT, data, fl_ctx)


class SiteErrorLogger(FLComponent):
    """Server widget: logs every site error event as ``<site>: task <task> failed: <message>`` (ERROR level)."""

    def __init__(self):
        super().__init__()
        self.errors = []

    def handle_event(self, event_type: str, fl_ctx: FLContext):
        if event_type != SITE_ERROR_EVENT:
            return
        data = fl_ctx.get_prop(FLContextKey.EVENT_DATA)
        if not isinstance(data, Shareable):
            return
        site = data.get_peer_prop(ReservedKey.IDENTITY_NAME, None) or "unknown site"
        self.errors.append((site, data.get("task"), data.get("error")))
        self.log_error(fl_ctx, f"{site}: task {data.get('task')!r} failed: {data.get('error')}", fire_event=False)
