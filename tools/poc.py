#!/usr/bin/env python
"""A real federation on one machine (NVFlare POC mode): separate server and site processes.

    python tools/poc.py up --sites 3 --data-root data/prostate [--root workspace/poc]
    python tools/poc.py submit build/jobs/prostate_mri_seg_fedavg [--timeout 1800] [--out results/]
    python tools/poc.py status
    python tools/poc.py down [--clean]

``up`` provisions a project (server, N sites site-1 ... site-N, admin kits) with
``nvflare poc prepare`` and starts the server and every site with ``nvflare poc start``.
Everything lives under ``--root`` and runs with ``HOME=<root>/home``, so the user's own
``~/.nvflare`` is neither read nor changed. The sites find their data through
``FEDHARMONY_DATA_ROOT`` (``--data-root``), set in their environment at start.

``submit`` uses the FLARE API as the project admin: submit the job folder, follow its
status, download the result (the server's run folder: results/, cross_site_val/,
app_server/, model_pool/ ...) and print the cross-site table. The same job goes in with
the NVFlare CLI: ``HOME=<root>/home nvflare job submit -j <job folder>`` (``up`` prints it).
"""

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ADMIN = "admin@nvidia.com"  # the project admin that `nvflare poc prepare` provisions
POC_PORTS = (8002, 8003)  # server (FL) and admin ports of `nvflare poc prepare`


def _env(root: Path, data_root: str = "") -> dict:
    env = {**os.environ, "HOME": str(root / "home"), "NVFLARE_POC_WORKSPACE": str(root / "poc")}
    if data_root:
        env["FEDHARMONY_DATA_ROOT"] = str(Path(data_root).resolve())
    return env


def _nvflare(root: Path, *args, data_root: str = "", check: bool = True) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("nvflare")
    res = subprocess.run([str(exe), *args], env=_env(root, data_root), capture_output=True, text=True,
                         cwd=str(root))
    if check and res.returncode != 0:
        raise RuntimeError(f"nvflare {' '.join(args)} failed ({res.returncode}):\n"
                           f"{res.stdout[-2000:]}{res.stderr[-2000:]}")
    return res


def admin_kit(root: Path) -> Path:
    return root / "poc" / "example_project" / "prod_00" / ADMIN


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
            return True
        except OSError:
            return False


def up(root: Path, sites: int, data_root: str, timeout: int = 120) -> dict:
    if not data_root or not Path(data_root).is_dir():
        raise FileNotFoundError(f"--data-root {data_root!r} is not a folder of site folders")
    busy = [p for p in POC_PORTS if not _port_free(p)]
    if busy:  # POC uses fixed ports; a second federation would fail with a vague timeout
        raise RuntimeError(f"port(s) {busy} already in use: another POC federation or FL server is running "
                           f"(stop it with `python tools/poc.py --root <its root> down`)")
    (root / "home").mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    _nvflare(root, "poc", "prepare", "-n", str(sites), "--force")
    t1 = time.time()
    try:
        _nvflare(root, "poc", "start", "--timeout", str(timeout), data_root=data_root)
    except RuntimeError:
        _nvflare(root, "poc", "stop", check=False)  # leave no half-started federation behind
        raise
    t2 = time.time()
    return {"prepare_s": t1 - t0, "start_s": t2 - t1}


def down(root: Path, clean: bool = False) -> dict:
    t0 = time.time()
    _nvflare(root, "poc", "stop", check=False)
    t1 = time.time()
    if clean:
        shutil.rmtree(root / "poc", ignore_errors=True)
    return {"stop_s": t1 - t0}


def session(root: Path, timeout: float = 30.0):
    from nvflare.fuel.flare_api.flare_api import new_secure_session

    kit = admin_kit(root)
    if not kit.is_dir():
        raise FileNotFoundError(f"no admin kit at {kit}: run `python tools/poc.py up` first")
    return new_secure_session(username=ADMIN, startup_kit_location=str(kit), timeout=timeout)


def submit(root: Path, job_folder: str, timeout: int, out: str = "") -> dict:
    """Submit, follow, download; returns {job_id, status, seconds, result}."""
    from nvflare.fuel.flare_api.flare_api import MonitorReturnCode

    job = Path(job_folder).resolve()
    if not (job / "meta.json").is_file():
        raise FileNotFoundError(f"{job} is not a job folder (no meta.json); export one with jobs/prostate.py --export")
    sess = session(root)
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
        status = sess.get_job_meta(job_id).get("status")
        seconds = time.time() - t0
        if rc != MonitorReturnCode.JOB_FINISHED:
            raise TimeoutError(f"job {job_id} did not finish in {timeout} s (status {status})")
        dest = Path(out or root / "results").resolve()
        dest.mkdir(parents=True, exist_ok=True)
        result = sess.download_job_result(job_id, str(dest))
    finally:
        sess.close()
    return {"job_id": job_id, "status": status, "seconds": seconds, "result": result}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default=str(REPO / "workspace" / "poc"), help="everything POC lives here")
    sub = p.add_subparsers(dest="command", required=True)
    u = sub.add_parser("up", help="provision and start server + sites")
    u.add_argument("--sites", type=int, default=3)
    u.add_argument("--data-root", required=True, help="folder of site folders (sites.json maps site-N)")
    s = sub.add_parser("submit", help="submit a job folder with the FLARE API, follow it, download the result")
    s.add_argument("job_folder")
    s.add_argument("--timeout", type=int, default=3600)
    s.add_argument("--out", default="", help="where the result goes (default <root>/results)")
    sub.add_parser("status", help="what the server sees")
    d = sub.add_parser("down", help="stop every process")
    d.add_argument("--clean", action="store_true", help="also delete the provisioned workspace")
    args = p.parse_args(argv)
    root = Path(args.root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    try:
        if args.command == "up":
            t = up(root, args.sites, args.data_root)
            print(f"POC federation up in {root}: server + {args.sites} sites "
                  f"(prepare {t['prepare_s']:.1f} s, start {t['start_s']:.1f} s)")
            print(f"submit with the CLI:  HOME={root / 'home'} nvflare job submit -j <job folder>")
            print(f"or the FLARE API:     python tools/poc.py --root {root} submit <job folder>")
        elif args.command == "down":
            t = down(root, args.clean)
            print(f"POC federation stopped in {t['stop_s']:.1f} s"
                  + (" and its workspace deleted" if args.clean else ""))
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
            r = submit(root, args.job_folder, args.timeout, args.out)
            print(f"job {r['job_id']}: {r['status']} in {r['seconds']:.1f} s; result in {r['result']}")
            if str(r["status"]) != "FINISHED:COMPLETED":
                return 1
            sys.path.insert(0, str(REPO / "tools"))
            from fl_results import report

            print(report(r["result"]))
    except (FileNotFoundError, RuntimeError, TimeoutError, ConnectionError) as e:
        p.exit(2, f"{p.prog}: error: {e}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
