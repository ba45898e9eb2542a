"""The two references of a study, trained without NVFlare: ``local`` and ``pooled`` (no NVFlare import).

* ``local``: each site trains alone on its own training split for ``rounds x local_epochs``
  epochs, the same epochs its federated counterpart trains.
* ``pooled``: one model trains on every site's training split pooled together (the
  centralized reference) for the same number of epochs; an epoch therefore covers every
  site's data once, and the model takes about as many optimizer steps as all the sites of a
  federation together.
* ``pooled_steps``: the same pooled data, for the optimizer steps FedAvg's global model takes:
  each "epoch" is cut to the mean site's steps per epoch (the mean over sites of its training
  cases / batch size, rounded up per site), so ``rounds x local_epochs`` of them match one
  site's trajectory. Batches are drawn from the whole pooled set (shuffled), so every site's
  data is used, just not all of it every epoch.

Both use the bundle's own trainer through :class:`fedharmony.bundle.site.BundleSite`, score
the model on the validation split at the start of every "round" (``local_epochs`` epochs),
as a federated site does, and at the end score the final model on every site's test split.

Run as ``python -m fedharmony.study.centralized SPEC.json OUT.json`` (the study tool does, one
process per run, so its log goes to a file and its memory is returned).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Optional

__all__ = ["train_reference", "mean_site_steps"]

logger = logging.getLogger("fedharmony.study")


def train_reference(mode: str, bundle_dir: str, config_files, overrides: dict, data: dict, out_dir: str,
                    rounds: int, local_epochs: int, metric: str, pixel_scale_roots: Optional[dict] = None) -> dict:
    """Train the ``local`` or ``pooled`` reference; returns ``{"site_scores", "site_results", "curve"}`` and, with
    ``pixel_scale_roots`` (factor as text -> a resampled test root, :mod:`fedharmony.study.robustness`),
    ``"pixel_scale_scores"``.

    ``data`` is a :class:`fedharmony.study.data.StudyData` (as a dict).
    """
    import torch

    from fedharmony.bundle.site import BundleSite
    from fedharmony.study.data import StudyData, pooled_dataset
    from fedharmony.study.scoring import score_on_site

    if mode not in ("local", "pooled", "pooled_steps"):
        raise ValueError(f"mode must be 'local', 'pooled' or 'pooled_steps', got {mode!r}")
    data = StudyData(data)
    out = Path(out_dir)
    sites = data.sites  # client name -> site folder
    if mode == "local":
        trainees = {folder: data.train_root / folder for folder in sites.values()}
    else:
        trainees = {"pooled": pooled_dataset(data, out / "pooled_data")}
    curve, finals = {}, {}
    for name, dataset_dir in trainees.items():
        t0 = time.time()
        site = BundleSite(str(bundle_dir), str(dataset_dir), str(out / "state" / name), name,
                          overrides=overrides, config_file=list(config_files))
        if mode == "pooled_steps":
            steps = mean_site_steps(data, site.trainer.data_loader.batch_size)
            site.trainer.state.epoch_length = steps
            logger.info("pooled_steps: %d optimizer steps per epoch (the mean site's; the pooled set has %d), "
                        "%d in all", steps, len(site.trainer.data_loader), steps * rounds * local_epochs)
        curve[name] = {}
        for r in range(rounds):
            with torch.random.fork_rng():  # scoring draws no training randomness, as on a federated site
                curve[name][r] = site.evaluate(None, "validation")[metric]
            site.train(None, local_epochs)
            logger.info("%s %s: round %d, validation %s %.4f (%.0f s)", mode, name, r, metric, curve[name][r],
                        time.time() - t0)
        finals[name] = site.state_dict()
    site_results = {}
    for folder in sites.values():
        weights = finals[folder] if mode == "local" else finals["pooled"]
        site_results[folder] = score_on_site(bundle_dir, data.test_root / folder, weights, metric,
                                             config_files, overrides)
        logger.info("%s: %s on %s's test split: %.4f (n=%d)", mode, metric, folder, site_results[folder]["score"],
                    site_results[folder]["n"])
    site_scores = {s: r["score"] for s, r in site_results.items()}
    extra = {}
    if pixel_scale_roots:
        from fedharmony.study.robustness import score_pixel_scales

        def score(root, folder):
            weights = finals[folder] if mode == "local" else finals["pooled"]
            return score_on_site(bundle_dir, root / folder, weights, metric, config_files, overrides)["score"]

        scored = score_pixel_scales(score, {k: Path(v) for k, v in pixel_scale_roots.items()}, list(sites.values()))
        extra["pixel_scale_scores"] = {"1": site_scores, **scored}
    return {"site_scores": site_scores, "site_results": site_results, "curve": curve, **extra}


def mean_site_steps(data, batch_size: int) -> int:
    """The optimizer steps of one epoch on the mean site: the mean over sites of ceil(training cases /
    batch size), rounded to the nearest step (at least 1)."""
    import math

    counts = [len(json.loads((data.train_root / folder / "datalist.json").read_text()).get("training", []))
              for folder in data.sites.values()]
    if not counts or not all(counts):
        raise ValueError(f"pooled_steps needs every site's training cases, got {counts}")
    return max(1, round(sum(math.ceil(n / batch_size) for n in counts) / len(counts)))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m fedharmony.study.centralized SPEC.json OUT.json", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    spec = json.loads(Path(argv[0]).read_text())
    import torch

    torch.set_num_threads(int(spec.pop("threads", 1)))
    result = train_reference(**spec)
    tmp = Path(argv[1]).with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, argv[1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
