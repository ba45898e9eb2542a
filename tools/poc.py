#!/usr/bin/env python
"""A real federation on one machine (NVFlare POC mode): separate server and site processes.

    python tools/poc.py up --sites 3 --data-root data/prostate [--root workspace/poc]
                           [--site-timeout 60] [--no-custom-code]
    python tools/poc.py submit build/jobs/prostate_mri_seg_fedavg [--timeout 1800] [--out results/]
    python tools/poc.py status
    python tools/poc.py start site-3          # (re)start one participant (server, site-N)
    python tools/poc.py down [--clean]

``up`` provisions a project (server, N sites site-1 ... site-N, admin kits) with
``nvflare poc prepare`` and starts the server and every site with ``nvflare poc start``.
Everything lives under ``--root`` and runs with ``HOME=<root>/home``, so the user's own
``~/.nvflare`` is neither read nor changed. The sites find their data through
``FEDHARMONY_DATA_ROOT`` (``--data-root``), set in their environment at start.

``--site-timeout S``: how long the server waits for a silent site (no heartbeat) before it
drops the site from running jobs (NVFlare's defaults add up to about 11 min: a 600 s
heartbeat timeout, set in the server's ``local/resources.json``, then a 60 s dead-site
grace period and a 30 s check lead, set through their ``NVFLARE_*`` variables).
``--no-custom-code``: every site refuses jobs that carry code, and the server and sites
allow-list the installed package's components (``tools/site_policy.py`` on each kit), so
only jobs exported with ``jobs/prostate.py --no-custom-code`` run.

``submit`` uses the FLARE API as the project admin (``--as`` another admin): submit the job folder, follow its
status, download the result (the server's run folder: results/, cross_site_val/,
app_server/, model_pool/ ...) and print the cross-site table. The same job goes in with
the NVFlare CLI: ``HOME=<root>/home nvflare job submit -j <job folder>`` (``up`` prints it).
"""

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
ADMIN = "admin@nvidia.com"  # the project admin that `nvflare poc prepare` provisions
SETTINGS = "federation.json"  # under --root: data root and environment given to `up`
POC_PORTS = (8002, 8003)  # server (FL) and admin ports of `nvflare poc prepare`


def _env(root: Path, data_root: str = "", extra: Optional[dict] = None) -> dict:
    env = {**os.environ, "HOME": str(root / "home"), "NVFLARE_POC_WORKSPACE": str(root / "poc"), **(extra or {})}
    if data_root:
        env["FEDHARMONY_DATA_ROOT"] = str(Path(data_root).resolve())
    return env


def _nvflare(root: Path, *args, data_root: str = "", check: bool = True,
             extra_env: Optional[dict] = None) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("nvflare")
    res = subprocess.run([str(exe), *args], env=_env(root, data_root, extra_env), capture_output=True, text=True,
                         cwd=str(root))
    if check and res.returncode != 0:
        raise RuntimeError(f"nvflare {' '.join(args)} failed ({res.returncode}):\n"
                           f"{res.stdout[-2000:]}{res.stderr[-2000:]}")
    return res


def kits(root: Path) -> Path:
    """The provisioned startup kits (and workspaces) of the server, the sites and the admins."""
    return root / "poc" / "example_project" / "prod_00"


def admin_kit(root: Path, admin: str = ADMIN) -> Path:
    return kits(root) / admin


def site_names(root: Path) -> list:
    return sorted(p.name for p in kits(root).iterdir() if (p / "startup" / "fed_client.json").is_file())


def _set_site_timeout(root: Path, seconds: float) -> dict:
    """The server drops a site that stayed silent ``seconds`` (see the module docstring)."""
    if seconds < 20:  # sites send a heartbeat every 10 s
        raise ValueError(f"--site-timeout must be >= 20 s (sites send a heartbeat every 10 s), got {seconds}")
    resources = kits(root) / "server" / "local" / "resources.json"
    config = json.loads(resources.read_text())
    config["servers"] = [{"heart_beat_timeout": seconds}]  # NVFlare merges it into fed_server.json's server
    resources.write_text(json.dumps(config, indent=2))
    return {"NVFLARE_DEAD_CLIENT_GRACE_PERIOD": str(min(60.0, seconds / 4)),
            "NVFLARE_DEAD_CLIENT_CHECK_LEAD_TIME": str(min(30.0, seconds / 4))}


def _no_custom_code(root: Path):
    from site_policy import allow_package, forbid_custom_code

    allow_package(kits(root) / "server")
    for site in site_names(root):
        allow_package(kits(root) / site)
        forbid_custom_code(kits(root) / site)


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
            return True
        except OSError:
            return False


def up(root: Path, sites: int, data_root: str, timeout: int = 120, site_timeout: Optional[float] = None,
       no_custom_code: bool = False) -> dict:
    if not data_root or not Path(data_root).is_dir():
        raise FileNotFoundError(f"--data-root {data_root!r} is not a folder of site folders")
    busy = [p for p in POC_PORTS if not _port_free(p)]
    if busy:  # POC uses fixed ports; a second federation would fail with a vague timeout
        raise RuntimeError(f"port(s) {busy} already in use: another POC federation or FL server is running "
                           f"(stop it with `python tools/poc.py --root <its root> down`)")
    (root / "home").mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    _nvflare(root, "poc", "prepare", "-n", str(sites), "--force")
    extra_env = _set_site_timeout(root, site_timeout) if site_timeout else {}
    if no_custom_code:
        _no_custom_code(root)
    # what `start` needs to bring one participant back with the same environment
    (root / SETTINGS).write_text(json.dumps({"data_root": str(Path(data_root).resolve()), "env": extra_env}))
    t1 = time.time()
    try:
        _nvflare(root, "poc", "start", "--timeout", str(timeout), data_root=data_root, extra_env=extra_env)
    except RuntimeError:
        _nvflare(root, "poc", "stop", check=False)  # leave no half-started federation behind
        raise
    t2 = time.time()
    return {"prepare_s": t1 - t0, "start_s": t2 - t1}


def start(root: Path, participant: str) -> None:
    """Start one participant of a federation made by ``up`` (after a crash, or to add it back)."""
    if not (root / SETTINGS).is_file() or not (kits(root) / participant / "startup").is_dir():
        raise FileNotFoundError(f"no participant {participant!r} in a federation at {root} (run `up` first)")
    settings = json.loads((root / SETTINGS).read_text())
    _nvflare(root, "poc", "start", "-p", participant, data_root=settings["data_root"], extra_env=settings["env"])


def _leftover_processes(root: Path) -> list:
    """Processes still running from this POC workspace (a job process whose parent was killed
    outlives ``nvflare poc stop``)."""
    workspace = str(kits(root)) + os.sep
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if any(arg.startswith(workspace) for arg in cmdline) and int(pid) != os.getpid():
            pids.append(int(pid))
    return pids


def down(root: Path, clean: bool = False) -> dict:
    t0 = time.time()
    _nvflare(root, "poc", "stop", check=False)
    for pid in _leftover_processes(root) if kits(root).is_dir() else []:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    t1 = time.time()
    if clean:
        shutil.rmtree(root / "poc", ignore_errors=True)
    return {"stop_s": t1 - t0}


def session(root: Path, timeout: float = 30.0, admin: str = ADMIN):
    from nvflare.fuel.flare_api.flare_api import new_secure_session

    kit = admin_kit(root, admin)
    if not kit.is_dir():
        raise FileNotFoundError(f"no admin kit at {kit}: run `python tools/poc.py up` first")
    return new_secure_session(username=admin, startup_kit_location=str(kit), timeout=timeout)


def submit(root: Path, job_folder: str, timeout: int, out: str = "", admin: str = ADMIN) -> dict:
    """Submit, follow, download; returns {job_id, status, seconds, result}."""
    from nvflare.fuel.flare_api.flare_api import MonitorReturnCode

    job = Path(job_folder).resolve()
    if not (job / "meta.json").is_file():
        raise FileNotFoundError(f"{job} is not a job folder (no meta.json); export one with jobs/prostate.py --export")
    sess = session(root, admin=admin)
    try:
        t0 = time.time()
        job_id = sess.submit_job(str(job))
        print(f"submitted {job.name}: job {job_id}", flush=True)
        last = {}

        def follow(_session, _job_id, meta, *_):
            status = meta.get("status")
            if status != last.get("status"):
                print(f"  {time.time() - t0:6.1f} s  {status}", flush=True)
                last["status"] = status
            return True

        rc = sess.monitor_job(job_id, timeout=timeout, poll_interval=2.0, cb=follow)
        meta = sess.get_job_meta(job_id)
        status = meta.get("status")
        for line in meta.get("job_deploy_detail") or [] if status != "FINISHED:COMPLETED" else []:
            print(f"  deploy: {line}", flush=True)  # e.g. a site that refuses custom code says so here
        seconds = time.time() - t0
        if rc != MonitorReturnCode.JOB_FINISHED:
            raise TimeoutError(f"job {job_id} did not finish in {timeout} s (status {status})")
        dest = Path(out or root / "results").resolve()
        dest.mkdir(parents=True, exist_ok=True)
        result = sess.download_job_result(job_id, str(dest))
    finally:
        sess.close()
    return {"job_id": job_id, "status": status, "seconds": seconds, "result": result}


def failure_reasons(result: str, limit: int = 20) -> list:
    """Why a job failed, as the server logged it: the errors sites sent back (``SiteErrorLogger``) and
    the server's own refusals and panics, from the downloaded run's ``log.txt``."""
    log = Path(result) / "workspace" / "log.txt"
    if not log.is_file():
        return []
    keep = ("failed:", "refused", "FATAL_SYSTEM_ERROR", "is gone from the job")
    lines = []
    for line in log.read_text(errors="replace").splitlines():
        if " - ERROR - " not in line:
            continue
        message = line.split(" - ERROR - ", 1)[1].strip()
        if message.startswith("[") and "] - " in message:  # NVFlare's context prefix: identity, run, peer ...
            message = message.split("] - ", 1)[1]
        if any(k in message for k in keep):
            lines.append(message)
    return lines[:limit]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default=str(REPO / "workspace" / "poc"), help="everything POC lives here")
    sub = p.add_subparsers(dest="command", required=True)
    u = sub.add_parser("up", help="provision and start server + sites")
    u.add_argument("--sites", type=int, default=3)
    u.add_argument("--data-root", required=True, help="folder of site folders (sites.json maps site-N)")
    u.add_argument("--site-timeout", type=float, help="seconds before a silent site is dropped from jobs "
                                                      "(default: NVFlare's, about 11 min)")
    u.add_argument("--no-custom-code", action="store_true",
                   help="sites refuse jobs that carry code; the installed package is allow-listed")
    s = sub.add_parser("submit", help="submit a job folder with the FLARE API, follow it, download the result")
    s.add_argument("job_folder")
    s.add_argument("--timeout", type=int, default=3600)
    s.add_argument("--out", default="", help="where the result goes (default <root>/results)")
    s.add_argument("--as", dest="admin", default=ADMIN,
                   help=f"admin user whose startup kit submits (default {ADMIN}; POC also has "
                        f"lead@nvidia.com and org-admin@nvidia.com)")
    sub.add_parser("status", help="what the server sees")
    st = sub.add_parser("start", help="start one participant again (server or site-N)")
    st.add_argument("participant")
    d = sub.add_parser("down", help="stop every process")
    d.add_argument("--clean", action="store_true", help="also delete the provisioned workspace")
    args = p.parse_args(argv)
    from nvflare.fuel.flare_api.api_spec import AuthorizationError

    root = Path(args.root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    try:
        if args.command == "up":
            t = up(root, args.sites, args.data_root, site_timeout=args.site_timeout,
                   no_custom_code=args.no_custom_code)
            print(f"POC federation up in {root}: server + {args.sites} sites "
                  f"(prepare {t['prepare_s']:.1f} s, start {t['start_s']:.1f} s)")
            print(f"submit with the CLI:  HOME={root / 'home'} nvflare job submit -j <job folder>")
            print(f"or the FLARE API:     python tools/poc.py --root {root} submit <job folder>")
        elif args.command == "down":
            t = down(root, args.clean)
            print(f"POC federation stopped in {t['stop_s']:.1f} s"
                  + (" and its workspace deleted" if args.clean else ""))
        elif args.command == "start":
            start(root, args.participant)
            print(f"{args.participant} started")
        elif args.command == "status":
            sess = session(root)
            try:
                info = sess.get_system_info()
                print(f"server: {info.server_info}")
                for c in info.client_info:
                    print(f"site: {c.name}, last connected {time.ctime(c.last_connect_time)}")
                for j in sess.list_jobs():
                    print(f"job {j.get('job_id')}: {j.get('name') or j.get('job_name')} {j.get('status')}")
            finally:
                sess.close()
        else:
            r = submit(root, args.job_folder, args.timeout, args.out, admin=args.admin)
            print(f"job {r['job_id']}: {r['status']} in {r['seconds']:.1f} s; result in {r['result']}")
            if str(r["status"]) != "FINISHED:COMPLETED":
                for line in failure_reasons(r["result"]):
                    print(f"  server log: {line}")
                return 1
            from fl_results import report

            print(report(r["result"]))
    except (FileNotFoundError, RuntimeError, TimeoutError, ConnectionError, ValueError, AuthorizationError) as e:
        p.exit(2, f"{p.prog}: error: {e}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
