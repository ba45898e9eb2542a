"""Test-time adaptation on a site that never trained: IOP-FL's unsupervised losses and the adaptation loop.

Nothing here sees a label. The loss per batch of 2.5D slices x (B, C, H, W):

    w_ent   * mean per-pixel entropy of softmax(f(x)) over classes
  + w_cons  * MSE(softmax f(x), T^-1 softmax f(T(x)))     T: Gaussian noise, flip, rot90
  + w_shape * || local max - local min of p_fg in a k x k window ||_2      (boundary smoothness)

with IOP-FL's released weights 10, 0.1 and 1e-6 and k = 21. Both branches of the
consistency term get gradients, as in the released code. Entropy is the standard
per-pixel one in nats; the released code sums over the batch axis, divides by C and works in bits
(log base 2), which scales it by B / (C ln 2) relative to ours (3.6 at batch 5, C = 2).

:class:`TestTimeAdapter` runs online adaptation over a site's volumes (Adam, a number
of passes, one step per chunk of slices) and logs the loss per pass and the routing
weights per expert. :func:`build_test_time_network` makes the network for each
compared method from a model pool (routing, TENT, BN statistics, expert mean, one expert).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fedharmony.bundle.inferers import check_volume_size
from fedharmony.methods.iopfl.routing import (build_routed_network, last_routing_weights, routed_layers, train_keeping_statistics, train_only,
                      use_batch_statistics)

logger = logging.getLogger(__name__)
DEFAULT_METHOD = "global"  # routed_inference.json's default (docs/methods/iopfl.md, "The default")

METHODS = ("routing", "routing_safe", "routing_released", "routing_sigmoid", "routing_source_stats", "tent", "bn_stats",
           "expert_mean", "global")
ROUTING_VARIANTS = {  # method -> build_routed_network options
    "routing": {},
    "routing_released": {"gate": "released"},
    "routing_sigmoid": {"gate": "sigmoid"},
    "routing_source_stats": {"batch_stats": False},
}


ENTROPY_SCALES = ("nats", "released")


def entropy_loss(logits: torch.Tensor, scale: str = "nats") -> torch.Tensor:
    """Entropy of the softmax over classes; logits (B, C, *spatial).

    ``nats``: mean over pixels of the per-pixel entropy in nats. ``released``: the released code's
    ``-sum_batch(p log2 p)`` averaged over (C, *spatial), which is ``B / (C ln 2)`` times ``nats``.
    """
    if scale not in ENTROPY_SCALES:
        raise ValueError(f"entropy scale must be one of {list(ENTROPY_SCALES)}, got {scale!r}")
    plogp = torch.softmax(logits, 1) * torch.log_softmax(logits, 1)
    if scale == "released":
        return -(plogp / math.log(2)).sum(0).mean()
    return -plogp.sum(1).mean()


def boundary_loss(logits: torch.Tensor, window: int = 21) -> torch.Tensor:
    """Frobenius norm of the local range (max - min in a ``window``^2 neighbourhood) of the
    foreground probability 1 - p(background): large for fragmented, irregular masks. (B, C, H, W)."""
    if window < 1 or window % 2 == 0:
        raise ValueError(f"window must be a positive odd size, got {window}")
    fg = 1.0 - torch.softmax(logits, 1)[:, :1]
    pad = window // 2
    local_range = F.max_pool2d(fg, window, 1, pad) + F.max_pool2d(-fg, window, 1, pad)
    return torch.linalg.vector_norm(local_range)


def augment(x: torch.Tensor, generator: torch.Generator, noise_std: float):
    """x (B, C, H, W) -> (T(x), inverse): Gaussian noise, a random flip of H and a rot90 (k even when H != W)."""
    flip = bool(torch.rand((), generator=generator) < 0.5)
    ks = (0, 1, 2, 3) if x.shape[-1] == x.shape[-2] else (0, 2)
    k = ks[int(torch.randint(len(ks), (), generator=generator))]
    noise = torch.randn(x.shape, generator=generator).to(x.device, x.dtype) * noise_std
    u = x + noise
    u = torch.flip(u, (-2,)) if flip else u
    u = torch.rot90(u, k, (-2, -1))

    def inverse(y: torch.Tensor) -> torch.Tensor:
        y = torch.rot90(y, -k, (-2, -1))
        return torch.flip(y, (-2,)) if flip else y

    return u, inverse


class UnsupervisedLoss(nn.Module):
    """The IOP-FL test-time loss (see the module docstring); returns (total, {component: value})."""

    def __init__(self, w_ent: float = 10.0, w_cons: float = 0.1, w_shape: float = 1e-6, window: int = 21,
                 noise_std: float = 0.5, seed: int = 0, entropy: str = "nats"):
        super().__init__()
        if min(w_ent, w_cons, w_shape) < 0 or noise_std < 0:
            raise ValueError("loss weights and noise_std must be >= 0")
        if entropy not in ENTROPY_SCALES:
            raise ValueError(f"entropy scale must be one of {list(ENTROPY_SCALES)}, got {entropy!r}")
        self.entropy = entropy
        self.w_ent, self.w_cons, self.w_shape = float(w_ent), float(w_cons), float(w_shape)
        self.window, self.noise_std = window, float(noise_std)
        self.generator = torch.Generator().manual_seed(seed)

    def forward(self, network: nn.Module, x: torch.Tensor):
        logits = network(x)
        parts = {"entropy": entropy_loss(logits, self.entropy)}
        total = self.w_ent * parts["entropy"]
        if self.w_cons:
            u, inverse = augment(x, self.generator, self.noise_std)
            parts["consistency"] = F.mse_loss(inverse(torch.softmax(network(u), 1)), torch.softmax(logits, 1))
            total = total + self.w_cons * parts["consistency"]
        if self.w_shape:
            parts["boundary"] = boundary_loss(logits, self.window)
            total = total + self.w_shape * parts["boundary"]
        return total, {k: float(v.detach()) for k, v in parts.items()}


def _volume_slabs(volume: torch.Tensor, divisible_by: int) -> torch.Tensor:
    """(1, H, W, D) -> (D, 3, H', W') 2.5D inputs zero-padded to a multiple of ``divisible_by`` (as Slab25DInferer)."""
    from fedharmony.bundle.transforms import volume_to_slabs

    h, w = volume.shape[1:3]
    return F.pad(volume_to_slabs(volume), (0, (-w) % divisible_by, 0, (-h) % divisible_by))


SAFEGUARD_CRITERIA = ("loss", "consensus", "departure", "labelled")
SAFEGUARD_MARGIN = 0.05  # the loss and departure criteria's relative margin, set before any measurement
# criteria that judge by agreement with the pool's consensus (and so need the pool's networks as a reference)
CONSENSUS_CRITERIA = ("consensus", "departure")


def check_safeguard(criterion: str) -> None:
    """Raise ``ValueError`` naming the allowed criteria unless ``criterion`` is one of ``SAFEGUARD_CRITERIA``."""
    if criterion not in SAFEGUARD_CRITERIA:
        raise ValueError(f"safeguard criterion must be one of {list(SAFEGUARD_CRITERIA)}, got {criterion!r}")


def departure_keeps(candidate_agreement: float, global_agreement: float, margin: float = SAFEGUARD_MARGIN) -> bool:
    """The ``departure`` criterion: keep the adapted network unless it agrees with the pool's consensus clearly
    less than the global model does, by more than ``margin`` (relative).

    Example: agreements 0.86 (adapted) and 0.89 (global) keep the adapted network (0.86 >= 0.89 x 0.95);
    0.40 and 0.89 fall back.
    """
    return not candidate_agreement < global_agreement * (1.0 - margin)


def foreground_counts(prediction: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """[|P and L|, |P| + |L|] (int64) of the foreground (class > 0) of a label map ``prediction`` and a
    reference ``label`` of one shape; summed over a volume's chunks, :func:`volume_dice` gives its Dice."""
    if prediction.shape != label.shape:
        raise ValueError(f"label maps of different shapes: {tuple(prediction.shape)} and {tuple(label.shape)}")
    p, g = prediction > 0, label > 0
    return torch.tensor([int((p & g).sum()), int(p.sum() + g.sum())], dtype=torch.int64)


def volume_dice(counts: torch.Tensor) -> float:
    """Foreground Dice 2 |P and L| / (|P| + |L|) from :func:`foreground_counts`; 1.0 when both are empty (the
    study's rule, :func:`fedharmony.core.results.mask_dice`).

    Example: P = [0, 1, 1, 0], L = [0, 1, 0, 0] -> counts [1, 3] -> 2 / 3.
    """
    inter, total = (int(v) for v in counts.tolist())
    return 1.0 if total == 0 else 2.0 * inter / total


def mask_agreement(a: torch.Tensor, b: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Counts for a pooled Dice of two label maps of one shape: a (num_classes - 1, 2) int64 tensor whose row
    c - 1 is [|a = c and b = c|, |a = c| + |b = c|] for foreground class c. Summed over chunks, the rows give a
    Dice pooled over a whole held-out set (:func:`pooled_dice`)."""
    if a.shape != b.shape:
        raise ValueError(f"label maps of different shapes: {tuple(a.shape)} and {tuple(b.shape)}")
    return torch.tensor([[int(((a == c) & (b == c)).sum()), int((a == c).sum() + (b == c).sum())]
                         for c in range(1, num_classes)], dtype=torch.int64).reshape(-1, 2)


def pooled_dice(counts: torch.Tensor) -> float:
    """Mean over foreground classes of 2 |A and B| / (|A| + |B|) from :func:`mask_agreement` counts; a class
    neither map has counts as full agreement (1.0).

    Example: a = [0, 1, 1, 0], b = [0, 1, 0, 0] (one foreground class) -> counts [[1, 3]] -> 2 / 3.
    """
    if counts.numel() == 0:
        raise ValueError("no foreground class to compare")
    return sum(2.0 * int(inter) / int(total) if total else 1.0 for inter, total in counts.tolist()) / len(counts)


class FallbackNetwork(nn.Module):
    """A test-time candidate (the routed network, adapted) guarded by a fallback (the global model as trained).

    :class:`TestTimeAdapter` adapts ``candidate`` on most of the site's volumes, then judges it against
    ``fallback`` on the volumes it held out from adaptation; if the candidate is not kept, every forward goes to
    the fallback. Two criteria, neither sees a label:

    * ``loss`` (the default): both networks' unsupervised loss (the adaptation loss, same augmentation draws).
      The candidate is kept only if its loss is lower than the fallback's by more than ``margin`` (relative).
      ``margin`` 0.05 was set before any measurement (a clear improvement, not noise), not tuned.
    * ``consensus``: agreement with the pool. The reference segmentation of a held-out batch is the argmax of
      the mean softmax of ``reference`` (every network of the pool, each normalizing with the batch's own
      statistics, nothing trained); agreement is the foreground Dice with it, pooled over the held-out
      volumes. The candidate is kept only if it agrees with the reference more than the fallback does
      (ties go to the fallback). No parameter: nothing to tune. It is meant to catch an adaptation that
      leaves the pool (a collapse to empty or fragmented masks) and a global model whose running statistics
      do not fit the site; it trusts the pool's majority, so a pool of mostly useless experts defeats it
      (``loss`` does not have that weakness, and has others: a lower entropy is not a better mask).
    * ``departure``: the same agreements, the burden of proof turned round: the candidate is kept unless it
      agrees with the consensus less than the fallback does by more than ``margin`` (relative; the loss
      criterion's 0.05, not tuned). ``loss`` and ``consensus`` fall back when adaptation does not clearly
      help; on the leave-one-site-out sites both were wrong more often than right where the two networks
      were close, and paid for it. ``departure`` falls back only when adaptation clearly leaves the pool (a
      collapse), which is the harm a safeguard exists to stop. Designed after those measurements; its
      independent test is the third set of unseen scanners (see docs/methods/iopfl.md).
    * ``labelled``: a few labelled volumes of the new site decide. The volumes that come with a label (the
      dataloader's ``label`` key, e.g. from ``labelled_dir`` in ``configs/routed_inference.json``) are held out
      of adaptation; the candidate is kept only if its mean foreground Dice over them is higher than the
      fallback's (ties go to the fallback). No parameter. Not unsupervised: it costs the site a few
      annotations, and is the criterion to use when a site must not end up worse than with the global model
      (the unsupervised ones did not track Dice across the scanners measured; docs/methods/iopfl.md).

    Args:
        candidate: the network to judge (adapted by :class:`TestTimeAdapter`).
        fallback: the network to fall back to; frozen.
        margin: ``loss`` and ``departure``, in [0, 1).
        holdout_every: the first usable volume and every ``holdout_every``-th after it are held out (>= 2); with
            ``labelled``, the volumes with a label are held out instead.
        criterion: one of ``SAFEGUARD_CRITERIA``.
        reference: ``consensus`` and ``departure``: the pool's networks (frozen, batch statistics), at least one.
    """

    def __init__(self, candidate: nn.Module, fallback: nn.Module, margin: float = SAFEGUARD_MARGIN,
                 holdout_every: int = 4, criterion: str = "loss", reference: Optional[Sequence[nn.Module]] = None):
        super().__init__()
        if not 0.0 <= margin < 1.0 or holdout_every < 2:
            raise ValueError(f"margin must be in [0, 1) and holdout_every >= 2, got {margin}, {holdout_every}")
        check_safeguard(criterion)
        if criterion in CONSENSUS_CRITERIA and not reference:
            raise ValueError(f"the {criterion} safeguard needs the pool's networks as its reference")
        self.candidate, self.fallback = candidate, fallback
        self.reference = nn.ModuleList(reference or [])
        for p in [*self.fallback.parameters(), *self.reference.parameters()]:
            p.requires_grad_(False)
        self.margin, self.holdout_every, self.criterion = float(margin), int(holdout_every), criterion
        self.use_fallback = False
        self.decision: Dict[str, object] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.fallback if self.use_fallback else self.candidate)(x)


class TestTimeAdapter:
    """Adapt a network to a new site's unlabelled volumes before inference.

    For each pass, for each volume from ``dataloader`` (dicts with an ``image`` key,
    (B, 1, H, W, D)), the volume's 2.5D slabs are cut into chunks of ``slices_per_batch``
    (the chunks the inferer will use, so normalization sees the same batches) and each
    chunk takes one Adam step on :class:`UnsupervisedLoss`. Only parameters with
    ``requires_grad`` train. Logs the loss per pass and, for a routed network, the
    routing weights per expert; ``history`` (also written to ``log_file``) keeps them.

    Args:
        network: a network from :func:`build_test_time_network` (or any prepared one).
        dataloader: the site's volumes (labels, if present, are never read).
        passes: passes over the site (0 = no update).
        lr: Adam learning rate.
        slices_per_batch, divisible_by, min_size: as the inferer's (same chunks, same padding).
        expert_names: names of the routing experts, for the logs.
        log_file: optional JSON file for the history.

    With a :class:`FallbackNetwork`, the first usable volume and every ``holdout_every``-th after it (with the
    ``labelled`` criterion: the volumes that come with a label) are held out of adaptation, and after the last
    pass the candidate and the fallback are scored on the held-out volumes; the decision (both scores, the
    network kept) is logged and stored in ``history`` and ``log_file``. Labels are read for that decision only.
    """

    __test__ = False  # not a pytest class, despite the name

    def __init__(self, network: nn.Module, dataloader: Iterable, passes: int = 2, lr: float = 1e-3,
                 slices_per_batch: int = 32, divisible_by: int = 16, min_size: int = 32,
                 loss: Optional[UnsupervisedLoss] = None,
                 expert_names: Optional[Sequence[str]] = None, log_file: Optional[str] = None, seed: int = 0,
                 device: Optional[torch.device] = None):
        if passes < 0 or lr <= 0 or slices_per_batch < 1:
            raise ValueError("passes must be >= 0, lr > 0 and slices_per_batch >= 1")
        self.network, self.dataloader = network, dataloader
        self.passes, self.lr, self.slices_per_batch, self.divisible_by = passes, lr, slices_per_batch, divisible_by
        self.min_size = min_size
        self.loss = loss or UnsupervisedLoss(seed=seed)
        self.expert_names = list(expert_names) if expert_names else None
        self.log_file = log_file
        self.device = device or next((p.device for p in network.parameters()), torch.device("cpu"))
        self.history: List[dict] = []
        self.seed = seed

    def _volumes(self, held_out: Optional[bool] = None):
        """(name, volume (1, H, W, D), label (1, H, W, D) or None) of every usable volume; with ``held_out``
        True / False only the held-out / the other volumes. Held out: with the ``labelled`` criterion the
        volumes with a label, otherwise the first usable volume and every ``holdout_every``-th after it."""
        n = 0
        guarded = self.network if isinstance(self.network, FallbackNetwork) else None
        by_label = guarded is not None and guarded.criterion == "labelled"
        every = guarded.holdout_every if guarded is not None else 0
        for batch in self.dataloader:
            if "image" not in batch:  # every input of the batch was unusable; the evaluator names them
                continue
            images = batch["image"]
            try:
                check_volume_size(images, self.min_size)
            except ValueError as e:  # adapt on the rest; inference refuses (and names) this input
                logger.warning("adaptation: %s; not used", e)
                continue
            names = batch.get("name") or [None] * len(images)
            labels = batch.get("label") if by_label else None
            for i, vol in enumerate(torch.as_tensor(images)):
                n += 1
                label = None if labels is None else torch.as_tensor(labels[i])
                if by_label:
                    held = label is not None
                else:
                    held = bool(every) and (n - 1) % every == 0
                if held_out is None or held == held_out:
                    yield names[i] or f"volume {n}", vol, label
        if n == 0:  # nothing usable: the network stays as built, and the inference summary says why
            logger.warning("adaptation: no usable volume to adapt on")

    def _chunks(self, held_out: Optional[bool] = None):
        """The chunks of 2.5D slabs of the volumes :meth:`_volumes` yields."""
        for _, vol, _ in self._volumes(held_out):
            slabs = _volume_slabs(vol, self.divisible_by).to(self.device)
            yield from torch.split(slabs, self.slices_per_batch)

    def _label_dice(self, guarded: FallbackNetwork) -> tuple:
        """(candidate's, fallback's) mean foreground Dice with the labels of the held-out (labelled) volumes,
        their names; (None, None, []) when no volume came with a label."""
        guarded.eval()
        dice: Dict[str, List[float]] = {"candidate": [], "fallback": []}
        names = []
        with torch.no_grad():
            for name, vol, label in self._volumes(held_out=True):
                if label.shape[1:] != vol.shape[1:]:
                    raise ValueError(f"the label of {name} has shape {tuple(label.shape[1:])} after preprocessing, "
                                     f"its volume {tuple(vol.shape[1:])}: not the same grid")
                h, w = vol.shape[1:3]
                # (1, H, W, D) -> (D, H', W'), padded as the slabs are: the label of each slab's centre slice
                target = F.pad(label[0].permute(2, 0, 1), (0, (-w) % self.divisible_by, 0, (-h) % self.divisible_by))
                slabs = _volume_slabs(vol, self.divisible_by).to(self.device)
                for key, net in (("candidate", guarded.candidate), ("fallback", guarded.fallback)):
                    counts = sum(foreground_counts(net(x).argmax(1).cpu(), t)
                                 for x, t in zip(torch.split(slabs, self.slices_per_batch),
                                                 torch.split(target, self.slices_per_batch)))
                    dice[key].append(volume_dice(counts))
                names.append(name)
        if not names:
            return None, None, []
        return sum(dice["candidate"]) / len(names), sum(dice["fallback"]) / len(names), names

    def _criterion(self, network: nn.Module) -> tuple:
        """(mean unsupervised loss, chunks) of ``network`` in inference mode on the held-out volumes; the
        loss's augmentations are re-drawn from the same seed for every network."""
        self.loss.generator.manual_seed(self.seed + 1)
        network.eval()
        total, n = 0.0, 0
        with torch.no_grad():
            for x in self._chunks(held_out=True):
                total += float(self.loss(network, x)[0])
                n += 1
        return (total / n if n else None), n  # None, not NaN: the decision goes to a JSON log

    def _agreements(self, guarded: FallbackNetwork) -> tuple:
        """(candidate's, fallback's) foreground Dice with the pool's consensus on the held-out volumes, and the
        number of held-out chunks ((None, None, 0) when nothing was held out)."""
        guarded.eval()
        counts: Dict[str, torch.Tensor] = {}
        n = 0
        with torch.no_grad():
            for x in self._chunks(held_out=True):
                probs = torch.stack([torch.softmax(r(x), 1) for r in guarded.reference]).mean(0)
                reference, classes = probs.argmax(1), probs.shape[1]
                for key, net in (("candidate", guarded.candidate), ("fallback", guarded.fallback)):
                    counts[key] = counts.get(key, 0) + mask_agreement(net(x).argmax(1), reference, classes)
                n += 1
        if not n:
            return None, None, 0
        return pooled_dice(counts["candidate"]), pooled_dice(counts["fallback"]), n

    def _decide(self, guarded: FallbackNetwork) -> dict:
        extra: Dict[str, object] = {}
        if guarded.criterion == "labelled":
            candidate, fallback, labelled = self._label_dice(guarded)
            n = len(labelled)
            what = ("Dice with the site's labels", "candidate_dice", "global_dice")
            keep = n > 0 and candidate > fallback
            rule = f"{'higher' if keep else 'not higher'} than the global model's"
            extra = {"labelled_volumes": labelled}
        elif guarded.criterion in CONSENSUS_CRITERIA:
            candidate, fallback, n = self._agreements(guarded)
            what = ("agreement with the pool's consensus", "candidate_agreement", "global_agreement")
            if guarded.criterion == "consensus":
                keep = n > 0 and candidate > fallback
                rule = f"{'higher' if keep else 'not higher'} than the global model's"
            else:  # departure
                keep = n > 0 and departure_keeps(candidate, fallback, guarded.margin)
                rule = f"{'not more' if keep else 'more'} than {guarded.margin:.0%} lower than the global model's"
        else:
            candidate, n = self._criterion(guarded.candidate)
            fallback, _ = self._criterion(guarded.fallback)
            keep = n > 0 and candidate < fallback * (1.0 - guarded.margin)
            what = ("loss", "candidate_loss", "global_loss")
            rule = f"{'more' if keep else 'not more'} than {guarded.margin:.0%} lower"
        if n == 0:
            why = ("no labelled volume to judge the adaptation on" if guarded.criterion == "labelled"
                   else "no usable volume to judge the adaptation on")
        else:
            why = f"held-out {what[0]} {candidate:.4f} vs the global model's {fallback:.4f} ({rule})"
        guarded.use_fallback = not keep
        guarded.decision = {"kept": "adapted" if keep else "global", "criterion": guarded.criterion,
                            what[1]: candidate, what[2]: fallback, "reason": why,
                            ("held_out_volumes" if guarded.criterion == "labelled" else "held_out_chunks"): n,
                            **({"margin": guarded.margin} if guarded.criterion in ("loss", "departure") else {}),
                            **({"reference_networks": len(guarded.reference)}
                               if guarded.criterion in CONSENSUS_CRITERIA else {}), **extra}
        logger.info("adaptation safeguard: %s; using the %s network", why, "adapted" if keep else "global")
        return guarded.decision

    def run(self) -> List[dict]:
        guarded = self.network if isinstance(self.network, FallbackNetwork) else None
        adapt_on = False if guarded is not None else None  # with a safeguard: adapt on the volumes not held out
        params = [p for p in self.network.parameters() if p.requires_grad]
        passes = self.passes
        if passes and not params:
            logger.info("adaptation: the network has no trainable parameter (method without adaptation); skipped")
            if guarded is None:
                self.network.eval()
                return self.history
            passes = 0
        optimizer = torch.optim.Adam(params, lr=self.lr) if params else None
        routed = bool(routed_layers(self.network))
        for p in range(passes):
            t0 = time.time()
            train_keeping_statistics(self.network)
            sums: Dict[str, float] = {}
            weights, steps = [], 0
            for x in self._chunks(held_out=adapt_on):
                total, parts = self.loss(self.network, x)
                if routed:
                    weights.append(last_routing_weights(self.network).mean(0))
                optimizer.zero_grad(set_to_none=True)
                total.backward()
                optimizer.step()
                steps += 1
                for k, v in {"loss": float(total.detach()), **parts}.items():
                    sums[k] = sums.get(k, 0.0) + v
            record = {"pass": p + 1, "steps": steps, "seconds": round(time.time() - t0, 2),
                      **{k: v / max(steps, 1) for k, v in sums.items()}}
            if weights:
                mean = torch.stack(weights).mean(0).tolist()
                names = self.expert_names or [f"expert {i}" for i in range(len(mean))]
                record["routing_weights"] = dict(zip(names, mean))
            self.history.append(record)
            if not steps:  # nothing usable to adapt on (said above), or every usable volume was held out
                if guarded is not None and guarded.criterion == "labelled" and p == 0:
                    logger.warning("adaptation: every usable volume has a label (held out to judge the adaptation): "
                                   "nothing left to adapt on; the routed network is judged as built")
                continue
            logger.info("adaptation pass %d/%d: loss %.4f (%s), %d steps, %.1f s%s", p + 1, self.passes,
                        record["loss"], ", ".join(f"{k} {record[k]:.4g}" for k in parts), steps, record["seconds"],
                        ("; routing weights " + ", ".join(f"{n} {w:.3f}" for n, w in record["routing_weights"].items())
                         if weights else ""))
        if guarded is not None:
            self.history.append({"safeguard": self._decide(guarded)})
        self.network.eval()
        if self.log_file:
            Path(self.log_file).parent.mkdir(parents=True, exist_ok=True)
            Path(self.log_file).write_text(json.dumps(self.history, indent=2) + "\n")
        return self.history


SCHEDULES = ("passes", "online")


class OnlineAdaptation(nn.Module):
    """The released IOP-FL schedule: every batch the inferer passes takes one adaptation step on that
    batch, and is then segmented by the network just updated; the network carries over to the next batch.

    Wrap the test-time network with it and give the inferer the released batch size (5 slices): the
    adaptation happens during inference (``TestTimeAdapter`` runs no pass first), in the order the
    inferer sees the slices. It runs under the evaluator's ``torch.no_grad`` (gradients are switched
    back on for the step). ``history`` keeps the loss of every step.

    Args:
        network: the test-time network (its parameters with ``requires_grad`` adapt; none = no step).
        loss: the :class:`UnsupervisedLoss` to step on.
        lr: Adam learning rate.
    """

    def __init__(self, network: nn.Module, loss: "UnsupervisedLoss", lr: float = 1e-3):
        super().__init__()
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        self.network, self.loss = network, loss
        params = [p for p in network.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(params, lr=lr) if params else None
        self.history: List[float] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.optimizer is not None:
            if not self.history:
                logger.info("online adaptation: one step per batch of %d slices, each batch then segmented by the "
                            "network just updated", x.shape[0])
            with torch.enable_grad():
                train_keeping_statistics(self.network)
                total, _ = self.loss(self.network, x)
                self.optimizer.zero_grad(set_to_none=True)
                total.backward()
                self.optimizer.step()
            self.history.append(float(total.detach()))
        self.network.eval()
        with torch.no_grad():
            return self.network(x)


def finish_schedule(network: nn.Module, log_file: Optional[str] = None) -> Optional[dict]:
    """After inference: for an :class:`OnlineAdaptation` network, log its steps and write them to ``log_file``
    (``{"schedule": "online", "steps", "loss"}``); nothing for the ``passes`` schedule (the adapter logged it)."""
    if not isinstance(network, OnlineAdaptation):
        return None
    record = {"schedule": "online", "steps": len(network.history), "loss": network.history}
    if network.history:
        logger.info("online adaptation: %d steps, loss %.4f (first) -> %.4f (last)", len(network.history),
                    network.history[0], network.history[-1])
    else:
        logger.info("online adaptation: 0 steps (no trainable parameter or no input)")
    if log_file:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        Path(log_file).write_text(json.dumps(record, indent=2) + "\n")
    return record


def with_schedule(network: nn.Module, schedule: str, loss: "UnsupervisedLoss", lr: float, method: str = "") -> nn.Module:
    """``network`` for the ``passes`` schedule (:class:`TestTimeAdapter` adapts before inference), or wrapped in
    :class:`OnlineAdaptation` for ``online`` (the released schedule)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"adaptation schedule must be one of {SCHEDULES}, got {schedule!r}")
    if schedule == "passes":
        return network
    if isinstance(network, FallbackNetwork) or method == "routing_safe":
        raise ValueError("routing_safe judges the adapted network on held-out volumes before inference; the online "
                         "schedule adapts during inference: use the passes schedule with it")
    return OnlineAdaptation(network, loss, lr)


def mean_state_dict(models: Sequence[nn.Module]) -> Dict[str, torch.Tensor]:
    """Parameter-wise mean of the models' state dicts (integer buffers from the last model)."""
    sds = [m.state_dict() for m in models]
    return {k: torch.stack([sd[k].float() for sd in sds]).mean(0).to(v.dtype) if v.is_floating_point() else v.clone()
            for k, v in sds[-1].items()}


def build_test_time_network(pool, method: str = "routing", device=None, safeguard: str = "loss") -> nn.Module:
    """The network each compared method scores with, from a :class:`fedharmony.methods.iopfl.model_pool.ModelPool`.

    * ``routing``: every convolution routed over all experts; gates + norm affine train.
    * ``routing_safe``: ``routing`` guarded by the global model (:class:`FallbackNetwork`) with the
      ``safeguard`` criterion: kept only if adaptation lowers the unsupervised loss on volumes held out from
      it (``loss``), if it agrees more than the global model with the pool's consensus there (``consensus``),
      or unless it agrees clearly less than the global model with that consensus (``departure``), or if its
      Dice with the labels of the site's labelled volumes is higher (``labelled``, see :func:`inputs_for`).
    * ``routing_released``: the same with the released code's gate (no ReLU, dropout 0.2 while adapting,
      random start, sigmoid weights not summing to 1).
    * ``routing_sigmoid``: our gate with a sigmoid output instead of the softmax (an ablation; not the
      released gate).
    * ``routing_source_stats``: routing, but normalization keeps the global model's running
      statistics (the batch's statistics are what ``bn_stats`` measures on its own).
    * ``tent``: the global model; norm on batch statistics, norm affine trains (entropy).
    * ``bn_stats``: the global model with norm on batch statistics, nothing trains.
    * ``expert_mean``: the parameter mean of all experts (running statistics too), nothing trains.
    * ``global`` (:data:`DEFAULT_METHOD`, the bundle's default) or an expert's name: that model as trained,
      nothing trains.
    """
    names = list(pool.names)
    check_safeguard(safeguard)
    if method == DEFAULT_METHOD:
        logger.info(f"test-time method: {DEFAULT_METHOD} (the pool's global model, nothing adapts). It is the bundle's "
                    f"default because no test-time method has yet passed a planned non-inferiority test against it "
                    f"on unseen scanners; --method routing (or routing_safe, ...) runs one")
    else:
        logger.info(f"test-time method: {method}")
    if method == "routing_safe":
        fallback = copy.deepcopy(pool.experts[-1])
        train_only(fallback, gates=False, norm_affine=False)
        reference = None
        if safeguard in CONSENSUS_CRITERIA:  # every network of the pool on the batch's statistics, as bn_stats
            reference = [use_batch_statistics(copy.deepcopy(e)) for e in pool.experts]
        net = FallbackNetwork(build_routed_network(pool.experts), fallback, criterion=safeguard, reference=reference)
    elif method in ROUTING_VARIANTS:
        net = build_routed_network(pool.experts, **ROUTING_VARIANTS[method])
    elif method in ("tent", "bn_stats"):
        net = use_batch_statistics(copy.deepcopy(pool.experts[-1]))
        train_only(net, gates=False, norm_affine=method == "tent")
    elif method == "expert_mean":
        net = copy.deepcopy(pool.experts[-1])
        net.load_state_dict(mean_state_dict(pool.experts))
        train_only(net, gates=False, norm_affine=False)
    elif method in names:
        net = copy.deepcopy(pool.experts[names.index(method)])
        train_only(net, gates=False, norm_affine=False)
    else:
        raise ValueError(f"unknown test-time method {method!r}; choose one of {METHODS} or an expert: {names}")
    return net.to(device or "cpu").eval()


def inputs_for(inputs: Sequence[dict], method: str, safeguard: str, labelled_dir: str = "") -> List[dict]:
    """The inputs routed inference runs over (from :func:`fedharmony.data.images.find_inputs`): with
    ``routing_safe`` and the ``labelled`` criterion, those with a label in ``labelled_dir`` get it
    (:func:`fedharmony.data.images.attach_labels`); labels are read by nothing else.

    Raises:
        ValueError: the ``labelled`` criterion without a ``labelled_dir``, or a ``labelled_dir`` that names no
            usable label (see ``attach_labels``).
    """
    check_safeguard(safeguard)
    needs_labels = method == "routing_safe" and safeguard == "labelled"
    if needs_labels and not labelled_dir:
        raise ValueError("routing_safe with adaptation#safeguard labelled needs labelled_dir: a folder of label maps "
                         "for a few of the site's volumes (<input name>_segmentation.nii.gz)")
    if not needs_labels:
        if labelled_dir:
            logger.warning("labelled_dir %s is not read: only routing_safe with adaptation#safeguard labelled uses "
                           "labels (method %s, safeguard %s)", labelled_dir, method, safeguard)
        return list(inputs)
    from fedharmony.data.images import attach_labels

    items = attach_labels(inputs, labelled_dir)
    labelled = sum("label" in item for item in items)
    logger.info("routing_safe (labelled): %d of %d volumes have a label; they are held out of adaptation and "
                "judge it", labelled, len(items))
    return items


def loss_for(method: str, w_ent: float = 10.0, w_cons: float = 0.1, w_shape: float = 1e-6, window: int = 21,
             noise_std: float = 0.5, seed: int = 0, entropy: str = "nats") -> UnsupervisedLoss:
    """The unsupervised loss a method adapts with: TENT is entropy only; routing uses all three terms
    (``entropy="released"``: the released code's entropy scale, see :func:`entropy_loss`)."""
    if method == "tent":
        return UnsupervisedLoss(w_ent=1.0, w_cons=0.0, w_shape=0.0, seed=seed, entropy=entropy)
    return UnsupervisedLoss(w_ent, w_cons, w_shape, window, noise_std, seed, entropy)
