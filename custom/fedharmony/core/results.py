"""Federation results: per-round metric tables, plots and the cross-site matrix (no NVFlare import)."""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path
from typing import Dict, Optional, Sequence


def write_round_metrics(records: Sequence[dict], out_dir: str | Path, tag: str = "val_mean_dice",
                        model: str = "global model") -> Dict[str, Path]:
    """Write ``metrics_by_round.csv`` (site, tag, round, value), ``summary.json`` and a plot of ``tag`` by round.

    ``records`` are ``{"site", "tag", "round", "value"}`` dicts; ``model`` names what ``tag``
    scores, for the plot (PRR-FL: the personalized model).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / "metrics_by_round.csv", "json": out / "summary.json", "png": out / f"{tag}_by_round.png"}
    rows = sorted(records, key=lambda r: (r["tag"], r["site"], r["round"]))
    with open(paths["csv"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["site", "tag", "round", "value"])
        w.writeheader()
        w.writerows(rows)
    series, personal = defaultdict(dict), defaultdict(dict)
    for r in rows:
        if r["tag"] in (tag, tag + PERSONALIZED_SUFFIX):
            (series if r["tag"] == tag else personal)[r["site"]][int(r["round"])] = float(r["value"])
    summary = {"tag": tag}
    for key, data in (("per_site", series), ("personalized_per_site", personal)):
        if data:
            summary[key] = {s: {"by_round": v, "last": v[max(v)], "best": max(v.values())} for s, v in data.items()}
            last = [s["last"] for s in summary[key].values()]
            summary["mean_last" if key == "per_site" else "personalized_mean_last"] = sum(last) / len(last)
    paths["json"].write_text(json.dumps(summary, indent=2) + "\n")
    plot_by_round(series, paths["png"], tag, personal, model)
    return paths


PERSONALIZED_SUFFIX = "_personalized"  # IOP-FL: the personalized model's score, next to the global one
AFTER_TRAINING_SUFFIX = "_after_training"  # the site's model scored after local training (before communication)
# the network that takes the server's answer, where the site uses another one (PRR-FL's deputy); scored
# only with score_after_training, at round start (right after the answer) and after local training
EXCHANGED_SUFFIX = "_exchanged"
# the tracked scores a retrogress view reads, as (round start, after local training) suffixes of the key metric:
# the model the site uses, and the exchanged network (where it is another one)
RETROGRESS_CURVES = {"uses": ("", AFTER_TRAINING_SUFFIX),
                     "exchanged": (EXCHANGED_SUFFIX, EXCHANGED_SUFFIX + AFTER_TRAINING_SUFFIX)}
RETROGRESS_SUFFIXES = tuple(suffix for pair in RETROGRESS_CURVES.values() for suffix in pair)


def plot_by_round(series: Dict[str, Dict[int, float]], path: str | Path, tag: str,
                  personalized: Optional[Dict[str, Dict[int, float]]] = None, model: str = "global model"):
    """One line per site (``model``); dashed, same colour: the site's IOP-FL personalized model if any."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for site in sorted(series):
        rounds = sorted(series[site])
        line, = ax.plot(rounds, [series[site][r] for r in rounds], marker="o", label=site)
        own = (personalized or {}).get(site)
        if own:
            ax.plot(sorted(own), [own[r] for r in sorted(own)], linestyle="--", color=line.get_color(),
                    label=f"{site} personalized")
    ax.set_xlabel("round (at its start)")
    ax.set_ylabel(tag)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"{tag}, each site's validation split: {model}"
                 + (" (solid), personalized (dashed)" if personalized else ""), fontsize=9)
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


def mask_dice(pred_path: str | Path, label_path: str | Path) -> float:
    """Foreground Dice (label > 0) between two NIfTI masks of the same grid (1.0 when both are empty)."""
    import nibabel as nib
    import numpy as np

    pred = np.asarray(nib.load(str(pred_path)).dataobj) > 0
    label = np.asarray(nib.load(str(label_path)).dataobj) > 0
    pred = pred.reshape(pred.shape[:3]) if pred.ndim > 3 else pred
    if pred.shape != label.shape:
        raise ValueError(f"{pred_path} has shape {pred.shape}, {label_path} has {label.shape}")
    denom = pred.sum() + label.sum()
    return 1.0 if denom == 0 else float(2.0 * np.logical_and(pred, label).sum() / denom)
