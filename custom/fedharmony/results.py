"""Federation results: per-round metric tables, plots and the cross-site matrix (no NVFlare import)."""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional, Sequence


def write_round_metrics(records: Sequence[dict], out_dir: str | Path, tag: str = "val_mean_dice") -> Dict[str, Path]:
    """Write ``metrics_by_round.csv`` (site, tag, round, value), ``summary.json`` and a plot of ``tag`` by round.

    ``records`` are ``{"site", "tag", "round", "value"}`` dicts.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / "metrics_by_round.csv", "json": out / "summary.json", "png": out / f"{tag}_by_round.png"}
    rows = sorted(records, key=lambda r: (r["tag"], r["site"], r["round"]))
    with open(paths["csv"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["site", "tag", "round", "value"])
        w.writeheader()
        w.writerows(rows)
    series = defaultdict(dict)
    for r in rows:
        if r["tag"] == tag:
            series[r["site"]][int(r["round"])] = float(r["value"])
    summary = {"tag": tag, "per_site": {s: {"by_round": v, "last": v[max(v)], "best": max(v.values())}
                                        for s, v in series.items()}}
    if series:
        last = [s["last"] for s in summary["per_site"].values()]
        summary["mean_last"] = sum(last) / len(last)
    paths["json"].write_text(json.dumps(summary, indent=2) + "\n")
    plot_by_round(series, paths["png"], tag)
    return paths


def plot_by_round(series: Dict[str, Dict[int, float]], path: str | Path, tag: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for site in sorted(series):
        rounds = sorted(series[site])
        ax.plot(rounds, [series[site][r] for r in rounds], marker="o", label=site)
    ax.set_xlabel("round (global model received)")
    ax.set_ylabel(tag)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"{tag} of the global model on each site's validation split")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def load_cross_site(path: str | Path, metric: str = "val_mean_dice") -> Dict[str, Dict[str, float]]:
    """``cross_val_results.json`` -> {evaluating site: {model name: metric}}."""
    raw = json.loads(Path(path).read_text())
    return {site: {model: float(m[metric]) for model, m in models.items() if m and metric in m}
            for site, models in raw.items()}


def find_workspace_file(workspace: str | Path, name: str) -> Optional[Path]:
    hits = sorted(Path(workspace).rglob(name))
    return hits[0] if hits else None


def cross_site_table(matrix: Dict[str, Dict[str, float]], site_names: Optional[Dict[str, str]] = None) -> str:
    """Markdown table: one row per evaluating site, one column per model, plus the mean row."""
    models = sorted({m for row in matrix.values() for m in row}, key=lambda m: (not m.startswith("SRV"), m))
    names = site_names or {}
    head = "| site (test split) | " + " | ".join(m.replace("SRV_", "server:") for m in models) + " |"
    lines = [head, "|" + "---|" * (len(models) + 1)]
    for site in sorted(matrix):
        label = f"{site} ({names[site]})" if site in names else site
        lines.append(f"| {label} | " + " | ".join(
            f"{matrix[site][m]:.3f}" if m in matrix[site] else "-" for m in models) + " |")
    means = []
    for m in models:
        vals = [row[m] for row in matrix.values() if m in row]
        means.append(f"{sum(vals) / len(vals):.3f}" if vals else "-")
    lines.append("| **mean** | " + " | ".join(means) + " |")
    return "\n".join(lines)
