"""What a method may read and change on a site: the contract between a method and the site runner
(no NVFlare import, no import of the site runner).

:class:`fedharmony.bundle.site.BundleSite` implements it; a :class:`fedharmony.methods.base.SiteMethod`
sees its site only through it (``self.site``). So the method layer can be read, and tested with a
stand-in site, without the bundle layer; and a change to the site runner that drops something a
method uses fails ``tests/test_method_specs.py`` rather than a federation.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Mapping, Optional, Protocol, runtime_checkable

import torch

__all__ = ["SiteContract", "CONTRACT_ATTRIBUTES", "CONTRACT_METHODS"]


@runtime_checkable
class SiteContract(Protocol):
    """One site's bundle, as a method sees it.

    Attributes:
        site_name: for logs and errors.
        round: rounds this site has finished.
        last_local_epochs: local epochs of the round now running.
        network: the site's model (what FedAvg trains and sends).
        optimizer: the bundle's optimizer of ``network``.
        trainer: the bundle's ignite trainer (its ``data_loader``, its events).
        base_loss: the bundle's training loss.
        iteration_update: the bundle's ``iteration_update`` (a trainer iteration function), or None.
        round_schedule: the learning rate by round (:class:`fedharmony.bundle.optim.RoundSchedule`).
    """

    site_name: str
    round: int
    last_local_epochs: int
    network: torch.nn.Module
    optimizer: torch.optim.Optimizer
    trainer: Any
    base_loss: torch.nn.Module
    iteration_update: Optional[Callable]
    round_schedule: Any

    def state_dict(self) -> Dict[str, torch.Tensor]:
        """The site's full model (shared and local keys), on the CPU."""

    def shared_weights(self) -> Dict[str, torch.Tensor]:
        """Every key of the exchanged model except the local ones."""

    def load_weights(self, weights: Mapping[str, object], keep_local: bool = True,
                     network: Optional[torch.nn.Module] = None):
        """Copy received weights into ``network`` (default: the site's model); local keys stay the site's."""

    def run_epochs(self, epochs: int, loss: Optional[torch.nn.Module] = None) -> int:
        """Run the bundle's trainer for ``epochs`` more epochs with ``loss``; returns the iterations run."""

    def evaluate(self, weights: Optional[Mapping[str, object]] = None, split: str = "validation") -> Dict[str, float]:
        """Score ``weights`` (default: the site's model) on one split."""

    def record_metric(self, metric: float, weights: Optional[Mapping[str, torch.Tensor]] = None):
        """Keep the best model seen by this site on disk."""


CONTRACT_ATTRIBUTES = tuple(SiteContract.__annotations__)
CONTRACT_METHODS = ("state_dict", "shared_weights", "load_weights", "run_epochs", "evaluate", "record_metric")
