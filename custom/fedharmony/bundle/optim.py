"""The bundles' optimizer and its round-level learning-rate schedule (no NVFlare import).

A federated site trains a few local epochs per round, so a schedule over rounds is a step
decay by round, not by epoch: round ``t`` (0-based, counted by the site) trains at

    lr_t = learning_rate * lr_round_gamma ** floor(t / lr_round_step)

The bundles' defaults (Adam, ``lr_round_gamma`` 1.0, state kept across rounds) leave the
learning rate alone. PRR-FL's released code trains with SGD (no momentum, lr 1e-2, weight
decay 1e-6), halves the rate every 5 rounds and builds its optimizers anew every round; its
released protocol sets ``optimizer_name: sgd``, ``lr_round_gamma: 0.5``, ``lr_round_step: 5``
and ``optimizer_reset_each_round: true``.

Example::

    >>> [round_learning_rate(1e-2, 0.5, 5, t) for t in (0, 4, 5, 10)]
    [0.01, 0.01, 0.005, 0.0025]
"""

from __future__ import annotations

import math
from typing import Iterable

import torch

__all__ = ["OPTIMIZERS", "build_optimizer", "round_learning_rate", "RoundSchedule"]

OPTIMIZERS = ("adam", "sgd")


def build_optimizer(name: str, params, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """``adam`` (``torch.optim.Adam``) or ``sgd`` (``torch.optim.SGD`` without momentum, the released PRR-FL's).

    Raises:
        ValueError: an unknown name, or a learning rate / weight decay that is not a finite number >= 0 (lr > 0).
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer_name {name!r}; choose one of {OPTIMIZERS}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"learning_rate must be a finite number > 0, got {lr!r}")
    if not (isinstance(weight_decay, (int, float)) and math.isfinite(weight_decay) and weight_decay >= 0):
        raise ValueError(f"weight_decay must be a finite number >= 0, got {weight_decay!r}")
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.0, weight_decay=weight_decay)
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)


def round_learning_rate(base_lr: float, gamma: float, step: int, round_index: int) -> float:
    """The learning rate of round ``round_index`` (0-based): ``base_lr * gamma ** (round_index // step)``."""
    return base_lr * gamma ** (round_index // step)


class RoundSchedule:
    """A bundle's round-level schedule: the learning rate of each round, and whether optimizers start afresh.

    Args:
        base_lr: the bundle's ``learning_rate``.
        gamma: ``lr_round_gamma`` in (0, 1] (1 = a constant rate).
        step: ``lr_round_step``, rounds per decay step (>= 1).
        reset_each_round: ``optimizer_reset_each_round``: drop every optimizer's state (Adam's moments,
            SGD's momentum buffers) at the start of each round, as an optimizer built anew would be.

    Raises:
        ValueError: a setting out of range, named.
    """

    def __init__(self, base_lr: float, gamma: float = 1.0, step: int = 1, reset_each_round: bool = False):
        if not (isinstance(gamma, (int, float)) and 0 < gamma <= 1):
            raise ValueError(f"lr_round_gamma must be in (0, 1], got {gamma!r}")
        if isinstance(step, bool) or not isinstance(step, int) or step < 1:
            raise ValueError(f"lr_round_step must be an integer >= 1, got {step!r}")
        if not isinstance(reset_each_round, bool):
            raise ValueError(f"optimizer_reset_each_round must be true or false, got {reset_each_round!r}")
        self.base_lr, self.gamma, self.step, self.reset_each_round = float(base_lr), float(gamma), step, reset_each_round

    @property
    def active(self) -> bool:
        """Whether the schedule changes anything (the defaults change nothing)."""
        return self.gamma != 1.0 or self.reset_each_round

    def apply(self, optimizers: Iterable[torch.optim.Optimizer], round_index: int) -> float:
        """Set round ``round_index``'s learning rate on every param group of ``optimizers`` (and drop their state
        with ``reset_each_round``); returns the rate. Does nothing when the schedule is inactive."""
        lr = round_learning_rate(self.base_lr, self.gamma, self.step, round_index)
        if not self.active:
            return lr
        for opt in optimizers:
            for group in opt.param_groups:
                group["lr"] = lr
            if self.reset_each_round:
                opt.state.clear()
        return lr
