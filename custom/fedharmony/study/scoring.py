"""Score a trained model on one site's test split with the bundle's own test evaluator (no NVFlare import).

The study scores every method the same way, after its run: the bundle's ``test#evaluator``
(the same transforms, inferer, post-processing and metrics a site uses in cross-site
evaluation) on the site's ``testing`` list, with the weights loaded into the bundle's network.
Only the test evaluator is built, so the training data is not loaded again.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, Mapping, Optional, Sequence

import torch

__all__ = ["score_on_site", "load_weights"]


def load_weights(path) -> Dict[str, torch.Tensor]:
    """A state dict from a checkpoint: a plain state dict, or NVFlare's ``{"model": state dict, ...}``."""
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path} is not a state dict (or NVFlare checkpoint holding one)")
    return obj


def score_on_site(bundle_dir, dataset_dir, weights: Mapping[str, torch.Tensor], metric: str,
                  config_files: Sequence[str] = ("configs/train.json",),
                  overrides: Optional[dict] = None) -> dict:
    """Run the bundle's test evaluator on ``dataset_dir``'s testing list with ``weights``.

    Returns:
        ``{"score": key metric, "metrics": {name: value}, "n": test cases,
        "per_case": [per-case key metric] (segmentation) or None, "se": standard error of the
        site's score}``; the SE is the per-case standard deviation over sqrt(n) for a per-case
        metric, and sqrt(p (1 - p) / n) of the accuracy for classification.
    """
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(Path(bundle_dir) / f) for f in config_files])
    parser["bundle_root"] = str(bundle_dir)
    parser["dataset_dir"] = str(dataset_dir)
    for key, value in (overrides or {}).items():
        parser[key] = value
    evaluator = parser.get_parsed_content("test#evaluator")
    evaluator.network.load_state_dict(dict(weights), strict=True)  # raises on a missing or unexpected key
    evaluator.run()
    metrics = {k: float(v) for k, v in evaluator.state.metrics.items() if isinstance(v, (int, float))}
    if metric not in metrics:
        raise KeyError(f"the test evaluator reported {sorted(metrics)}, not {metric!r}")
    n = len(evaluator.data_loader.dataset)
    per_case, se = None, math.nan
    details = (getattr(evaluator.state, "metric_details", None) or {}).get(metric)
    if details is not None:
        values = torch.as_tensor(details).float()
        values = values.reshape(values.shape[0], -1).nanmean(dim=1) if values.ndim > 1 else values
        per_case = [float(v) for v in values]
        if len(per_case) > 1:
            se = float(torch.tensor(per_case).std(unbiased=True)) / math.sqrt(len(per_case))
    else:
        accuracy = next((v for k, v in metrics.items() if "accuracy" in k), None)
        if accuracy is not None and n:
            se = math.sqrt(max(accuracy * (1 - accuracy), 0.0) / n)
    return {"score": metrics[metric], "metrics": metrics, "n": n, "per_case": per_case, "se": se}
