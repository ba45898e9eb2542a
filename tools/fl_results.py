#!/usr/bin/env python
"""Print the results of a finished federation from its workspace.

    python tools/fl_results.py WORKSPACE [--data-root DATA] [--metric val_accuracy]

Shows the cross-site matrix (every site scores every model on its test split; the
server's global model first, where the job has one) and where the per-round summary, plot
and TensorBoard records are. With --data-root, simulator names are labelled with their site
folder. The metric defaults to the bundle's key metric (from summary.json: val_mean_dice for
prostate, val_macro_f1 for the classification bundle).
"""

import argparse
import json
import sys
from pathlib import Path

from fedharmony.core.results import cross_site_table, find_workspace_file, load_cross_site


def report(workspace, data_root=None, metric=None) -> str:
    ws = Path(workspace)
    if not ws.is_dir():
        raise FileNotFoundError(f"workspace not found: {ws}")
    summary = find_workspace_file(ws, "summary.json")
    metric = metric or (json.loads(summary.read_text()).get("tag") if summary else None) or "val_mean_dice"
    names = {}
    if data_root and (Path(data_root) / "sites.json").is_file():
        names = json.loads((Path(data_root) / "sites.json").read_text())
    lines = []
    cse = find_workspace_file(ws, "cross_val_results.json")
    if cse:
        matrix = load_cross_site(cse, metric)
        lines += [f"Cross-site {metric}, test split ({cse}):", "", cross_site_table(matrix, names), ""]
        glob_col = [row.get("SRV_FL_global_model.pt") for row in matrix.values()]
        glob_col = [v for v in glob_col if v is not None]
        if glob_col:
            lines.append(f"global model: mean {sum(glob_col) / len(glob_col):.3f}, worst {min(glob_col):.3f}, "
                         f"best {max(glob_col):.3f}, spread {max(glob_col) - min(glob_col):.3f}")
        own = [row[site] for site, row in matrix.items() if site in row]  # IOP-FL / PRR-FL: the personalized model
        if own:
            lines.append(f"each site's own model on its own test split: mean {sum(own) / len(own):.3f}, "
                         f"worst {min(own):.3f}")
    else:
        lines.append(f"no cross_val_results.json under {ws} (job without cross-site evaluation, or not finished)")
    for name in ("summary.json", f"{metric}_by_round.png", "model_pool"):
        path = find_workspace_file(ws, name)
        if path:
            lines.append(f"{name}: {path}")
    tb = find_workspace_file(ws, "tb_events")
    if tb:
        lines.append(f"TensorBoard: tensorboard --logdir {tb}")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("workspace")
    p.add_argument("--data-root")
    p.add_argument("--metric", help="cross-site metric to show (default: the bundle's key metric)")
    args = p.parse_args(argv)
    try:
        print(report(args.workspace, args.data_root, args.metric))
    except FileNotFoundError as e:
        p.error(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
