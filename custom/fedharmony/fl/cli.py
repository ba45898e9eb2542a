"""The command line of every fedharmony job script (``jobs/<task>.py``): one flag set, any bundle.

The algorithm is the job's choice (``--algorithm``), the task is the bundle's (``--bundle``,
defaulted by each job script).

A simulator run shows one line per round on the terminal, each site's score under its data
folder's name, and writes NVFlare's own log to ``<workspace>/<job name>.log`` (named at the
start and the end)::

    round 5: BIDMC 0.5659 | BMC 0.5888 | HK 0.6312 | I2CVB 0.4199 | RUNMC 0.6072 | UCL 0.1825 | mean 0.4993 (val_mean_dice, global model)

(from ``make demo``)

``--verbose`` shows NVFlare's log on the terminal instead.
"""

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional

from nvflare.recipe import SimEnv  # consumes NVFlare's own --export / --export-dir flags

from fedharmony.core.files import read_site_map
from fedharmony.data.datalist import smallest_split
from fedharmony.fl.job import ALGORITHMS, FedHarmonyRecipe
from fedharmony.fl.summary import ROUND_MARK
from fedharmony.methods import SPECS
from fedharmony.methods.protocols import PROTOCOLS, check_protocol, needs_smallest_site, released_methods

CHILD_ENV = "FEDHARMONY_JOB_CHILD"  # set in the process that runs the simulator for a quiet parent


def saved_round(checkpoint: str) -> int:
    """The round an NVFlare global-model checkpoint (``FL_global_model.pt``) was saved after."""
    import torch

    try:
        meta = torch.load(checkpoint, map_location="cpu", weights_only=True).get("meta_props") or {}
    except Exception as e:  # not there, not readable here, or not a checkpoint
        sys.exit(f"--initial-model {checkpoint}: cannot read its round ({type(e).__name__}: {e}); "
                 f"give --start-round")
    if "current_round" not in meta:
        sys.exit(f"--initial-model {checkpoint} does not say its round; give --start-round")
    return int(meta["current_round"])


def job_parser(default_bundle: str, description: str = __doc__) -> argparse.ArgumentParser:
    """Every flag of a job script: the common ones here, each method's from its ``SPEC`` (:func:`add_method_flags`)."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--algorithm", choices=ALGORITHMS, default="fedavg")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--local-epochs", type=int, default=1)
    p.add_argument("--sites", type=int, default=6, help="number of simulated sites (site-1 ... site-N)")
    p.add_argument("--threads", type=int, default=0, help="simulator threads (default: one per site)")
    p.add_argument("--torch-threads", type=int, default=1, help="torch CPU threads per site process")
    p.add_argument("--data-root", default="", help="folder of site folders (default: $FEDHARMONY_DATA_ROOT)")
    p.add_argument("--bundle", default=default_bundle, help=f"MONAI bundle folder (default {default_bundle})")
    p.add_argument("--workspace", default="/tmp/nvflare/fedharmony", help="simulator workspace root")
    p.add_argument("--override", default="{}", help='bundle overrides as JSON, e.g. \'{"learning_rate": 0.001}\'')
    p.add_argument("--name", help="job name (default <bundle name>_<algorithm>, or <task>_<algorithm>)")
    p.add_argument("--no-cross-site-eval", action="store_true")
    p.add_argument("--min-clients", type=int, help="sites needed to start and to go on (default: --sites)")
    p.add_argument("--cross-site-timeout", type=int,
                   help="seconds cross-site evaluation waits for a site (default NVFlare's 600 / 6000)")
    p.add_argument("--no-custom-code", action="store_true",
                   help="ship no code: sites and server run their installed fedharmony package")
    p.add_argument("--privacy-percentile", type=float,
                   help="share only update values above this percentile (NVFlare PercentilePrivacy)")
    p.add_argument("--privacy-gamma", type=float, default=0.01, help="clip shared update values to +-gamma per local step")
    p.add_argument("--initial-model", help="server-side checkpoint to start from, e.g. the FL_global_model.pt "
                                           "of a run whose server died")
    p.add_argument("--start-round", type=int, help="number of the first round (default: 0, or the round after "
                                                   "the one --initial-model was saved at)")
    p.add_argument("--memory-gc-rounds", type=int, default=0, help="server gc + malloc_trim every N rounds")
    p.add_argument("--patience", type=int, help="early stopping (NVFlare's): stop after N rounds in which the sites' "
                                                "mean validation key metric did not improve")
    p.add_argument("--tracking", choices=["tensorboard", "mlflow", "wandb"], default="tensorboard",
                   help="experiment tracking on the server (NVFlare's receivers; default tensorboard)")
    p.add_argument("--protocol", choices=list(PROTOCOLS), default="paper",
                   help="paper (default) or released: the released code's choices where they differ "
                        f"({', '.join(released_methods())}; see fedharmony.methods.protocols)")
    p.add_argument("--verbose", action="store_true", help="show NVFlare's log on the terminal (default: a file)")
    p.add_argument("--score-after-training", action="store_true",
                   help="sites also score their model after local training (the retrogress curve), and PRR-FL's "
                        "deputy after it takes the server's answer and after training")
    p.add_argument("--fingerprint", action="store_true",
                   help="before round 1 the sites send their training scans' header numbers (spacing, matrix, field "
                        "of view) and the server chooses pixdim (their median in-plane spacing) and image_size (a crop "
                        "holding their median field of view) for every site; written to the server's "
                        "fingerprint.json (not with a hand-set pixdim / image_size)")
    p.add_argument("--fingerprint-max-image-size", type=int,
                   help="with --fingerprint: the largest crop (a multiple of 16); coarser pixels beyond it")
    add_method_flags(p)
    return p


def main(default_bundle: str, description: str = __doc__, argv=None, default_overrides: Optional[dict] = None) -> int:
    """Parse the job flags, build the recipe, run it in the simulator (or export it with NVFlare's
    own ``--export`` / ``--export-dir`` flags, which ``SimEnv`` consumes).

    ``default_overrides``: bundle overrides of this job script (e.g. ``{"task": "histology"}``),
    under the user's ``--override``.
    """
    p = job_parser(default_bundle, description)
    args = p.parse_args(argv)
    try:
        overrides = json.loads(args.override)
    except json.JSONDecodeError as e:
        p.error(f"--override is not JSON: {e}")
    if not isinstance(overrides, dict):
        p.error(f"--override must be a JSON object of bundle config ids, got {args.override!r}")
    overrides = {**(default_overrides or {}), **overrides}
    start_round = args.start_round
    if start_round is None:
        start_round = saved_round(args.initial_model) + 1 if args.initial_model else 0
        if args.initial_model:
            print(f"resuming from {args.initial_model} (saved after round {start_round - 1}): "
                  f"rounds {start_round} .. {start_round + args.rounds - 1}")
    try:
        check_protocol(args.protocol, args.algorithm)
    except ValueError as e:
        p.error(f"--protocol: {e}")
    protocol_flags = {}
    if args.protocol != "paper":
        protocol_flags["protocol"] = args.protocol
        if needs_smallest_site(args.algorithm) and args.data_root and "max_train_cases" not in overrides:
            try:  # the simulator's sites: site-1 .. site-N of the data root
                protocol_flags["max_train_cases"], smallest = smallest_split(args.data_root, num_sites=args.sites)
            except (OSError, ValueError) as e:
                p.error(f"--protocol {args.protocol}: cannot size the smallest site's training set: {e}")
            print(f"protocol {args.protocol}: every site trains on {protocol_flags['max_train_cases']} cases "
                  f"(the smallest site, {smallest})", flush=True)
    method_flags = given_method_flags(p, args)
    try:
        recipe = FedHarmonyRecipe(
            args.algorithm, bundle_dir=args.bundle, num_rounds=args.rounds,
            min_clients=args.min_clients or args.sites, local_epochs=args.local_epochs,
            data_root=os.path.abspath(args.data_root) if args.data_root else "",
            overrides=overrides, num_threads=args.torch_threads, cross_site_eval=not args.no_cross_site_eval,
            name=args.name or (f"{overrides['task']}_{args.algorithm}" if 'task' in overrides else None),
            initial_model=os.path.abspath(args.initial_model) if args.initial_model else None,
            start_round=start_round, privacy_percentile=args.privacy_percentile,
            privacy_gamma=args.privacy_gamma, ship_code=not args.no_custom_code,
            memory_gc_rounds=args.memory_gc_rounds, cross_site_timeout=args.cross_site_timeout,
            score_after_training=args.score_after_training, tracking=args.tracking, patience=args.patience,
            fingerprint=args.fingerprint, fingerprint_max_image_size=args.fingerprint_max_image_size,
            **protocol_flags, **method_flags)
    except (KeyError, ValueError, TypeError, FileNotFoundError) as e:
        p.error(str(e))
    script = os.path.abspath(sys.argv[0])
    from nvflare.recipe.spec import _peek_recipe_args  # NVFlare strips --export from sys.argv at import

    exporting = _peek_recipe_args()[0] or "--export" in (argv or [])
    if not (args.verbose or exporting or os.environ.get(CHILD_ENV)) and os.path.isfile(script):
        log_path = Path(args.workspace) / f"{recipe.name}.log"
        child = [sys.executable, script, *(argv if argv is not None else sys.argv[1:])]
        return run_quietly(child, log_path, site_names(args.data_root, args.sites))
    run = recipe.execute(SimEnv(num_clients=args.sites, num_threads=args.threads or args.sites,
                                workspace_root=args.workspace))
    if run is not None:
        print(f"workspace: {run.get_result()}")
    return 0



def add_method_flags(parser: argparse.ArgumentParser):
    """One flag per setting of every method, from the methods' ``SPEC`` (a group per method)."""
    for spec in SPECS.values():
        if not spec.settings:
            continue
        group = parser.add_argument_group(f"{spec.name} settings (only with --algorithm {spec.name})")
        for s in spec.settings:
            if s.default is None:
                default = "default: the bundle's" if s.goes_to == "bundle" else ""
            else:
                default = f"default {str(s.default).lower() if s.type is bool else s.default}"
            if s.type is bool:
                group.add_argument(s.flag, dest=s.name, action="store_true", default=None,
                                   help=f"{s.help}; {default}")
            else:
                notes = ", ".join(x for x in ("" if s.choices else s.range_text(), default) if x)
                group.add_argument(s.flag, dest=s.name, type=s.type, choices=s.choices or None, default=None,
                                   metavar=None if s.choices else s.type.__name__.upper(),
                                   help=f"{s.help}" + (f" ({notes})" if notes else ""))


def given_method_flags(parser: argparse.ArgumentParser, args) -> Dict[str, object]:
    """The method settings given on the command line; one of another method's is an error naming both."""
    given = {}
    for spec in SPECS.values():
        for s in spec.settings:
            value = getattr(args, s.name)
            if value is None:
                continue
            if spec.name != args.algorithm:
                parser.error(f"{s.flag} is a setting of {spec.name}, not of --algorithm {args.algorithm}")
            given[s.name] = value
    return given


def site_names(data_root: str, sites: int) -> Dict[str, str]:
    """Simulator site names (``site-1`` ...) -> data folder names, from ``<data_root>/sites.json``."""
    names = {f"site-{i}": f"site-{i}" for i in range(1, sites + 1)}
    try:
        names.update({k: v for k, v in (read_site_map(data_root) if data_root else {}).items() if k in names})
    except ValueError:
        pass  # names are cosmetic here; the sites themselves report a bad map
    return names


def round_line(line: str, names: Dict[str, str]) -> Optional[str]:
    """``[round] 3: site-1=0.71 site-2=0.80 mean=0.75 (tag, model)`` -> ``round 3: BIDMC 0.7100 | ...``."""
    match = re.search(re.escape(ROUND_MARK) + r" (\d+): (.*?) mean=(\S+) \((.*)\)", line)
    if not match:
        return None
    number, scores, mean, what = match.groups()
    pairs = sorted((names.get(site, site), value) for site, value in (p.split("=", 1) for p in scores.split()))
    return f"round {number}: " + " | ".join(f"{n} {v}" for n, v in pairs) + f" | mean {mean} ({what})"


def run_quietly(cmd: List[str], log_path: Path, names: Dict[str, str]) -> int:
    """Run the job script again as a child with NVFlare's output to ``log_path``; show round lines and errors."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    print(f"NVFlare log: {log_path}", flush=True)
    shown_errors = 0
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, CHILD_ENV: "1"})
        for line in proc.stdout:
            log.write(line)
            shown = round_line(line, names)
            if shown:
                print(shown, flush=True)
            elif line.startswith("workspace:") or line.startswith("resuming from"):
                print(line.rstrip(), flush=True)
            elif (" ERROR " in line or line.startswith("Traceback")) and shown_errors < 20:
                shown_errors += 1
                print("  " + line.rstrip()[:240], flush=True)
        rc = proc.wait()
    if rc != 0:
        tail = log_path.read_text().splitlines()[-25:]
        print("\n".join(["the simulator failed (exit %d); the end of its log:" % rc, *tail]), file=sys.stderr)
    print(f"NVFlare log: {log_path}", flush=True)
    return rc
