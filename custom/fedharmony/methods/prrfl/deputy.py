"""PRR-FL's deputy-enhanced transfer on a site (no NVFlare).

A site holds two models of one architecture: the personalized model p (the bundle's
``network``, never sent, never overwritten by the server) and its deputy d (sent to the
server and replaced by the aggregation's answer). Before each local epoch both are scored
on the site's training data (:func:`fedharmony.core.metrics.mean_f1`: macro-F1 for classification, foreground
Dice for segmentation), giving ``f_p`` and ``f_d``, and :func:`next_stage` picks how they
teach each other that epoch:

=========  =======================  =======================
stage      p trains on              d trains on
=========  =======================  =======================
recover    loss                     loss + KL(p -> d)
exchange   loss + KL(d -> p)        loss + KL(p -> d)
sublimate  loss + KL(d -> p)        loss
=========  =======================  =======================

"loss" is the bundle's own loss (cross-entropy for classification, DiceCE for the prostate
bundle); ``KL(t -> s)`` is the distillation term of :func:`distillation_kl` (temperature 1,
weight 1, teacher detached). Every batch goes through both models; each has its own
optimizer (same class and settings as the bundle's).
"""

from __future__ import annotations

import copy
import logging
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from fedharmony.core.metrics import confusion, mean_f1

logger = logging.getLogger(__name__)

RECOVER, EXCHANGE, SUBLIMATE = "recover", "exchange", "sublimate"
STAGES = (RECOVER, EXCHANGE, SUBLIMATE)
DEFAULT_ALPHA1, DEFAULT_ALPHA2 = 0.7, 0.9


def check_alphas(alpha1: float, alpha2: float) -> Tuple[float, float]:
    ok = all(isinstance(a, (int, float)) and 0.0 < a <= 1.0 for a in (alpha1, alpha2))
    if not ok or alpha1 > alpha2:
        raise ValueError(f"PRR-FL thresholds need 0 < alpha1 <= alpha2 <= 1, got alpha1={alpha1!r}, alpha2={alpha2!r}")
    return float(alpha1), float(alpha2)


def next_stage(previous: Optional[str], f_personal: float, f_deputy: float,
               alpha1: float = DEFAULT_ALPHA1, alpha2: float = DEFAULT_ALPHA2) -> str:
    """The stage of the coming epoch.

    ``previous`` is the last epoch's stage, None at the first epoch of a round (the stage
    resets every round, so the deputy the server just replaced is first repaired):

    * recover: first epoch of the round, or the deputy fell below ``alpha1 * f_p``;
    * exchange: right after recover (deputy at least ``alpha1 * f_p``), or later while
      the deputy stays below ``alpha2 * f_p``;
    * sublimate: after exchange (or sublimate) once the deputy reaches ``alpha2 * f_p``.
    """
    if previous is not None and previous not in STAGES:
        raise ValueError(f"unknown stage {previous!r}; stages are {STAGES}")
    if previous is None or f_deputy < alpha1 * f_personal:
        return RECOVER
    if previous == RECOVER:
        return EXCHANGE
    return EXCHANGE if f_deputy < alpha2 * f_personal else SUBLIMATE


KL_REDUCTIONS = ("mean", "batchmean")


def distillation_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """``KL(softmax(teacher) || softmax(student))`` over the class axis (dim 1), teacher detached.

    ``mean`` (ours): summed over classes and averaged over everything else, so per image for
    ``(N, C)`` logits and per pixel for ``(N, C, H, W)``. ``batchmean`` (the released code's
    ``F.kl_div(..., reduction="batchmean")``): summed over everything but the batch, divided by N;
    the same for ``(N, C)``, but ``H * W`` times larger for segmentation, where it then outweighs
    the supervised loss.
    """
    if reduction not in KL_REDUCTIONS:
        raise ValueError(f"KL reduction must be one of {KL_REDUCTIONS}, got {reduction!r}")
    log_student = F.log_softmax(student_logits, dim=1)
    log_teacher = F.log_softmax(teacher_logits.detach(), dim=1)
    pointwise = (log_teacher.exp() * (log_teacher - log_student)).sum(dim=1)
    return pointwise.mean() if reduction == "mean" else pointwise.sum() / student_logits.shape[0]


def stage_losses(stage: str, loss_fn: Callable, logits_personal: torch.Tensor, logits_deputy: torch.Tensor,
                 target: torch.Tensor, kl_reduction: str = "mean") -> Tuple[torch.Tensor, torch.Tensor]:
    """``(loss of p, loss of d)`` for one batch in ``stage`` (see the module table)."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; stages are {STAGES}")
    loss_p = loss_fn(logits_personal, target)
    loss_d = loss_fn(logits_deputy, target)
    if stage in (EXCHANGE, SUBLIMATE):
        loss_p = loss_p + distillation_kl(logits_personal, logits_deputy, kl_reduction)
    if stage in (RECOVER, EXCHANGE):
        loss_d = loss_d + distillation_kl(logits_deputy, logits_personal, kl_reduction)
    return loss_p, loss_d


def copy_optimizer(optimizer: torch.optim.Optimizer, network: nn.Module) -> torch.optim.Optimizer:
    """A fresh optimizer of the same class and settings over ``network``'s parameters."""
    return type(optimizer)(network.parameters(), **optimizer.defaults)


class DeputyTransferIteration:
    """``iteration_update`` for MONAI's ``SupervisedTrainer``: trains p (the trainer's network
    and optimizer) and its deputy together with deputy-enhanced transfer.

    The deputy starts as a copy of ``network`` (both models from the same initial weights)
    with a copy of ``optimizer``. Each bundle's ``configs/prrfl.json`` overlay (which
    ``FedHarmonyRecipe`` layers on ``train.json`` for ``prrfl``) sets::

        "iteration_update": {"_target_": "fedharmony.methods.prrfl.deputy.DeputyTransferIteration",
                             "network": "@network", "optimizer": "@optimizer",
                             "alpha1": "@prrfl_alpha1", "alpha2": "@prrfl_alpha2"}

    At the first iteration of each epoch it scores both models on the trainer's data loader
    (eval mode, no gradient; the loader's augmentations apply, as in the released code) and
    sets the epoch's stage; ``history`` keeps ``(epoch, stage, f_p, f_d)`` and the log says
    it. Call :meth:`start_round` before each federated round. Cost per step: two forward
    and two backward passes, plus two scoring passes over the training data per epoch.

    Args:
        network, optimizer: the bundle's (personalized) model and its optimizer.
        alpha1, alpha2: the stage thresholds (released: 0.7, 0.9).
        include_background: count class 0 in the stage score (default: yes for
            classification, i.e. ``(N, C)`` outputs; no for segmentation).
        kl_reduction: ``mean`` (default) or ``batchmean`` (released), see :func:`distillation_kl`.
    """

    def __init__(self, network: nn.Module, optimizer: torch.optim.Optimizer, alpha1: float = DEFAULT_ALPHA1,
                 alpha2: float = DEFAULT_ALPHA2, include_background: Optional[bool] = None,
                 kl_reduction: str = "mean"):
        self.alpha1, self.alpha2 = check_alphas(alpha1, alpha2)
        if kl_reduction not in KL_REDUCTIONS:
            raise ValueError(f"kl_reduction must be one of {KL_REDUCTIONS}, got {kl_reduction!r}")
        self.kl_reduction = kl_reduction
        self.deputy = copy.deepcopy(network)
        self.deputy_optimizer = copy_optimizer(optimizer, self.deputy)
        self.include_background = include_background
        self.stage: Optional[str] = None
        self.history: List[Tuple[int, str, float, float]] = []
        self._epoch: Optional[int] = None

    def start_round(self):
        """The stage resets every round: the next epoch is recover."""
        self.stage, self._epoch = None, None

    @torch.no_grad()
    def score(self, engine, network: nn.Module) -> float:
        """``mean_f1`` of ``network`` on the trainer's training data."""
        was_training = network.training
        network.eval()
        total, include_background = None, self.include_background
        try:
            for batchdata in engine.data_loader:
                batch = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
                logits = engine.inferer(batch[0], network)
                counts = confusion(logits, batch[1])
                total = counts if total is None else total + counts
                if include_background is None:
                    include_background = logits.ndim == 2
        finally:
            network.train(was_training)
        return mean_f1(total, include_background) if total is not None else 0.0

    def _set_stage(self, engine):
        f_p, f_d = self.score(engine, engine.network), self.score(engine, self.deputy)
        self.stage = next_stage(self.stage, f_p, f_d, self.alpha1, self.alpha2)
        self.history.append((int(engine.state.epoch), self.stage, f_p, f_d))
        logger.info("epoch %d: stage %s (training-set score personalized %.4f, deputy %.4f)",
                    engine.state.epoch, self.stage, f_p, f_d)

    def __call__(self, engine, batchdata: Dict) -> Dict:
        from monai.utils.enums import CommonKeys as Keys

        if batchdata is None:
            raise ValueError("must provide batch data for current iteration.")
        if engine.state.epoch != self._epoch:  # first iteration of an epoch
            self._epoch = engine.state.epoch
            self._set_stage(engine)
        batch = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        inputs, targets = batch[0], batch[1]
        engine.network.train()
        self.deputy.train()
        logits_p = engine.inferer(inputs, engine.network)
        logits_d = engine.inferer(inputs, self.deputy)
        loss_p, loss_d = stage_losses(self.stage, engine.loss_function, logits_p, logits_d, targets,
                                      self.kl_reduction)
        engine.optimizer.zero_grad(set_to_none=True)
        self.deputy_optimizer.zero_grad(set_to_none=True)
        # the teacher side of each KL term is detached, so one backward gives each model its own gradient
        (loss_p + loss_d).backward()
        engine.optimizer.step()
        self.deputy_optimizer.step()
        out = {Keys.IMAGE: inputs, Keys.LABEL: targets, Keys.PRED: logits_p, Keys.LOSS: loss_p.detach(),
               "deputy_loss": loss_d.detach()}
        engine.state.output = out
        return out
