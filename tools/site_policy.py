#!/usr/bin/env python
"""Set a site's NVFlare policy for fedharmony jobs in its startup kit's ``local/`` folder.

    python tools/site_policy.py <kit> --allow-package            # run fedharmony without custom code
    python tools/site_policy.py <kit> --allow-package --forbid-custom-code

``<kit>`` is a provisioned participant folder (the server's or a site's: it holds
``startup/`` and ``local/``). The tool edits the two files NVFlare reads there:

* ``local/resources.json``: adds the package's NVFlare components to ``class_allow_list``,
  each by its full class path (``fedharmony.fl.SITE_COMPONENTS`` on a site,
  ``SERVER_COMPONENTS`` on the server; NVFlare's default list already has the rest,
  ``PercentilePrivacy`` included). A job without a ``custom/`` folder may only name
  allow-listed classes; that is how a site runs the product from its installed package
  instead of code that arrives with the job. Exact paths, not the package prefix: a prefix
  would admit anything importable under it. The list starts from the kit's own
  (``resources.json``, else ``resources.json.default``); a ``fedharmony.`` prefix entry
  written by an older version of this tool is replaced; nothing else changes.

  Such a job still names a bundle and overrides: the installed package runs the site's own
  installed bundle and takes overrides only as plain values of its tunable ids
  (``fedharmony.bundle.job_policy``), so nothing the job carries is evaluated.
* ``local/authorization.json`` (``--forbid-custom-code``): the kit's policy with the
  ``byoc`` right ("bring your own code") set to ``none`` for every role, so this site
  refuses any job that carries a ``custom/`` folder, whoever submits it.

Edit the kit before the participant starts; NVFlare reads these files at start-up.
"""

import argparse
import json
import sys
from pathlib import Path

ROLES = ("project_admin", "org_admin", "lead", "member")


def _local(kit: Path) -> Path:
    local = Path(kit) / "local"
    if not (Path(kit) / "startup").is_dir() or not local.is_dir():
        raise FileNotFoundError(f"{kit} is not a provisioned startup kit (needs startup/ and local/)")
    return local


def _read(local: Path, name: str) -> dict:
    for candidate in (local / name, local / f"{name}.default"):
        if candidate.is_file():
            return json.loads(candidate.read_text())
    raise FileNotFoundError(f"no {name} or {name}.default in {local}")


def package_components(kit: Path) -> tuple:
    """The fedharmony classes this participant builds: the server's or a site's."""
    from fedharmony.fl import SERVER_COMPONENTS, SITE_COMPONENTS

    return SERVER_COMPONENTS if (Path(kit) / "startup" / "fed_server.json").is_file() else SITE_COMPONENTS


def _edit_allow_list(kit: Path, edit) -> Path:
    """Rewrite the kit's ``class_allow_list`` (starting from NVFlare's default when the kit has none)
    with ``edit(list) -> list``, in enforce mode; returns the file written."""
    local = _local(kit)
    resources = _read(local, "resources.json")
    allow = resources.get("class_allow_list")
    if allow is None:
        from nvflare.app_common.widgets.component_path_authorizer import DEFAULT_CLASS_ALLOW_LIST

        allow = list(DEFAULT_CLASS_ALLOW_LIST)
    resources["class_allow_list"] = edit(list(allow))
    resources.setdefault("class_list_enforcement_mode", "enforce")
    out = local / "resources.json"
    out.write_text(json.dumps(resources, indent=2))
    return out


def allow_package(kit: Path) -> Path:
    """Add the package's classes to the kit's class allow-list; returns the file written."""
    def edit(allow):
        allow = [a for a in allow if a not in ("fedharmony.", "fedharmony.fl.")]  # an older, too broad entry
        return allow + [c for c in package_components(kit) if c not in allow]

    return _edit_allow_list(kit, edit)


def forbid_custom_code(kit: Path) -> Path:
    """Take the ``byoc`` right from every role; returns the file written."""
    local = _local(kit)
    policy = _read(local, "authorization.json")
    permissions = policy.setdefault("permissions", {})
    for role in ROLES:
        rights = permissions.get(role)
        if rights == "any":  # "any" means every right; spell them out, minus byoc
            rights = {"submit_job": "any", "clone_job": "any", "manage_job": "any", "download_job": "any",
                      "view": "any", "operate": "any", "shell_commands": "any"}
        rights = dict(rights or {})
        rights["byoc"] = "none"
        permissions[role] = rights
    out = local / "authorization.json"
    out.write_text(json.dumps(policy, indent=2))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("kit", help="a participant's startup kit folder (holds startup/ and local/)")
    p.add_argument("--allow-package", action="store_true", help="allow-list fedharmony's NVFlare components")
    p.add_argument("--forbid-custom-code", action="store_true", help="refuse every job that carries code")
    args = p.parse_args(argv)
    if not (args.allow_package or args.forbid_custom_code):
        p.error("nothing to do: give --allow-package and/or --forbid-custom-code")
    try:
        if args.allow_package:
            out = allow_package(Path(args.kit))
            print(f"allow-listed {', '.join(package_components(Path(args.kit)))} in {out}")
        if args.forbid_custom_code:
            print(f"custom code refused for every role in {forbid_custom_code(Path(args.kit))}")
    except (FileNotFoundError, json.JSONDecodeError) as e:
        p.exit(2, f"{p.prog}: error: {e}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
