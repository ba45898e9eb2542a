"""Which bundle, configs and overrides a site or the server may use for a job (see :mod:`fedharmony.bundle.job_policy`).

The mode is the site's, read from what NVFlare deployed, never from the job's arguments:
a job that carries code (NVFlare marks it ``byoc``: its app has a ``custom/`` folder) runs
only where the site's authorization let it in, and the site then runs the job's code
anyway, so the job's bundle copy and overrides are used as they are. A job without code
runs on the installed package, and then nothing in the job is parsed as a config.
"""

import os
from dataclasses import dataclass, field
from typing import List, Optional

from nvflare.apis.fl_constant import FLContextKey, WorkspaceConstants
from nvflare.apis.fl_context import FLContext

from fedharmony.bundle import job_policy

BYOC_META_KEY = "byoc"  # NVFlare's AppValidationKey.BYOC, set on the deployed job's meta


def job_ships_code(fl_ctx: FLContext) -> bool:
    """True when NVFlare deployed this job with its own code (``app/custom``), so the site agreed to run it."""
    meta = fl_ctx.get_prop(FLContextKey.JOB_META) or {}
    if isinstance(meta, dict) and meta.get(BYOC_META_KEY):
        return True
    app_root = fl_ctx.get_prop(FLContextKey.APP_ROOT) or ""
    return bool(app_root) and os.path.isdir(os.path.join(app_root, WorkspaceConstants.CUSTOM_FOLDER_NAME))


@dataclass
class JobBundle:
    """The bundle a participant runs for this job, after the policy checks.

    ``trusted``: the job ships code (its bundle copy and overrides are used as they are);
    otherwise ``root`` is the participant's installed bundle and ``overrides`` passed
    :func:`fedharmony.bundle.job_policy.validate_overrides`.
    """

    root: str
    config_files: List[str]
    overrides: dict = field(default_factory=dict)
    trusted: bool = False


def resolve_job_bundle(fl_ctx: FLContext, *, bundle_root: str, bundle_name: str, bundle_version: str,
                       bundle_digest: str, config_files, overrides: Optional[dict], data_root: str = "") -> JobBundle:
    """Apply the participant's policy to a job's bundle arguments.

    Raises:
        PolicyError: the job asks for something a participant that runs no job code refuses
            (an override that is not plain data on a tunable id, a bundle that differs from the
            installed one, a data folder of its own choosing).
    """
    app_root = fl_ctx.get_prop(FLContextKey.APP_ROOT) or ""
    files = [config_files] if isinstance(config_files, str) else list(config_files or ["configs/train.json"])
    if job_ships_code(fl_ctx):
        if bundle_root:
            return JobBundle(os.path.join(app_root, bundle_root), files, dict(overrides or {}), trusted=True)
        installed = job_policy.resolve_installed_bundle(bundle_name, bundle_version, bundle_digest)
        return JobBundle(str(installed), files, dict(overrides or {}), trusted=True)
    if data_root:
        raise job_policy.PolicyError("the job sets data_root; a site that runs no job code takes its data folder "
                                     "only from its own configuration (FEDHARMONY_DATASET_DIR / FEDHARMONY_DATA_ROOT)")
    name = bundle_name or os.path.basename(os.path.normpath(bundle_root or ""))
    installed = job_policy.resolve_installed_bundle(name, bundle_version, bundle_digest)
    copies = {os.path.join(app_root, "config", name)}
    if bundle_root and not os.path.isabs(bundle_root):
        copies.add(os.path.join(app_root, bundle_root))
    for copy in sorted(copies):
        job_policy.check_job_copy(copy, installed)
    files = job_policy.check_config_files(installed, files)
    checked = job_policy.validate_overrides(overrides or {}, job_policy.load_tunables(installed))
    return JobBundle(str(installed), files, checked, trusted=False)
