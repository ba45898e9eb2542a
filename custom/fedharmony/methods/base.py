"""What a federated method does on a site, as one object the site runner calls (no NVFlare import).

:class:`fedharmony.bundle.site.BundleSite` runs a MONAI bundle's trainer and evaluators; it
knows no method, and a method sees it only through :class:`fedharmony.methods.contract.SiteContract`.
Each round it calls the :class:`SiteMethod` chosen by the job, in this order::

    receive(weights, meta)        the server's answer (default: load the global weights)
    prepare()                     before the round-start score (HarmoFL: prime the amplitude target)
    -- score the site's model on its validation split; kept as "best" if best_at_round_start --
    training_loss(base_loss)      the loss of local training (FedProx: + proximal term)
    before_training()             (PRR-FL: reset the deputy's stage)
    -- local training: the bundle's trainer, local_epochs epochs --
    after_training()              before the state is saved (IOP-FL: the moving average)
    after_round(key)              extra scores / work (IOP-FL, Ditto: the personalized model)
    outgoing()                    the weights and meta to send

A method keeps its own state (:meth:`state_dict` / :meth:`load_state_dict`); the site saves it
with the model, optimizer and counters in one file, so a restarted site process resumes it.

Adding a method: a subpackage ``fedharmony/methods/<name>/`` with ``__init__.py`` (its ``SPEC``,
:class:`fedharmony.methods.spec.MethodSpec`: settings, site class, recipe, server components),
``site.py`` (a ``SiteMethod`` subclass) and ``server.py`` (its recipe, a
:class:`fedharmony.fl.recipe.BundleRecipe` subclass), and one line in
:data:`fedharmony.methods.REGISTRY`. The flags, the recipe's validation, the allow-lists, the
method table and the tests that run over :data:`fedharmony.methods.METHODS` follow; a method with
a bundle overlay (``overlay``) also needs that config file in each bundle it supports.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Tuple

import torch

from fedharmony.methods.contract import SiteContract
from fedharmony.methods.spec import MethodSpec

__all__ = ["SiteMethod", "RoundNotes", "PLAIN_TYPES"]

PLAIN_TYPES = (bool, int, float, str)


@dataclass
class RoundNotes:
    """What a method adds to a round's report.

    Attributes:
        tracked: extra scalars for this round (``{"val_mean_dice_personalized": 0.81}``).
        note: text for the round's log line (``", personalized 0.8100"``).
        per_epoch: scalars with one value per local epoch (``{"prrfl_stage": [1, 2]}``).
    """

    tracked: Dict[str, float] = field(default_factory=dict)
    note: str = ""
    per_epoch: Dict[str, List[float]] = field(default_factory=dict)


class SiteMethod:
    """FedAvg on a site: take the global model, train, send the whole model. Subclasses change one step.

    Class attributes (read by the recipe, the study tool and the reports as well):

    * ``name``: the registry name (``fedavg``).
    * ``spec``: the method's declaration (its package's ``SPEC``), whose ``goes_to="site"`` settings are the
      keyword arguments of ``__init__``.
    * ``overlay``: a bundle config layered on ``configs/train.json`` (``configs/harmofl.json``), or None.
    * ``local_keys``: regex of state-dict keys that never leave the site ("" = none).
    * ``personalized``: the site's result is its own model (its best ``best_model.pt``), not the global one.
    * ``best_at_round_start``: the round-start score (of the received model) may become the site's best.
    * ``best_after_training``: the score after local training may become the site's best.
    * ``scores_after_training``: always score the model after local training.
    * ``scored_model``: what the round-start score measures, for logs (``global`` / ``personalized``).
    * ``result_tag``: suffix of the tracked score of the site's result, when it is not the round-start
      score (``_personalized`` for IOP-FL and Ditto).
    * ``result``: what each site ends with, in words (for study reports).
    * ``needs_cross_site_eval``: the server collects the sites' models through cross-site evaluation.
    * ``released_settings``: the bundle settings of the authors' released code where it differs from
      the paper (``protocol="released"``, :mod:`fedharmony.methods.protocols`); None: the method has no
      released protocol. Server-side choices of that protocol stay in the method's recipe.
    * ``released_cuts_to_smallest_site``: the released protocol also trains every site on the smallest
      site's number of training cases (bundle setting ``max_train_cases``).
    * ``released_elsewhere``: where the released choices live instead, when they are not a training
      protocol (IOP-FL's are test-time options), for the error a ``protocol="released"`` job gets.

    Settings are the method's keyword arguments; they come from the job, so a subclass checks
    each (type and range) in ``__init__``: for a site that runs no job code they are the only
    thing the job decides about the method.
    """

    name = "fedavg"
    spec: Optional[MethodSpec] = None
    overlay: Optional[str] = None
    local_keys = ""
    personalized = False
    best_at_round_start = True
    best_after_training = False
    scores_after_training = False
    scored_model = "global"
    result_tag = ""
    result = "the final global model"
    needs_cross_site_eval = False
    released_settings: Optional[Mapping[str, object]] = None
    released_cuts_to_smallest_site = False
    released_elsewhere = ""

    def __init__(self):
        self.site: Optional[SiteContract] = None

    @classmethod
    def from_settings(cls, settings: Optional[Mapping[str, object]] = None) -> "SiteMethod":
        """Build from a job's settings dict: only the method's settings that go to the site
        (:class:`fedharmony.methods.spec.Setting`, ``goes_to="site"``), plain values; anything else is
        refused with a clear error (the constructor checks each value against its declaration)."""
        settings = dict(settings or {})
        accepted = {s.name for s in (cls.spec.settings if cls.spec else ()) if s.goes_to == "site"}
        foreign = sorted(str(k) for k in settings if k not in accepted)
        if foreign:
            raise ValueError(f"method {cls.name!r}: {foreign} {'is not a site setting' if len(foreign) == 1 else 'are not site settings'}"
                             f" of {cls.name}; its site settings: {sorted(accepted)}")
        for k, v in settings.items():
            if v is not None and not isinstance(v, PLAIN_TYPES):
                raise ValueError(f"method {cls.name!r}: setting {k!r} must be a plain number, bool or string, "
                                 f"got {type(v).__name__}")
        try:
            return cls(**{k: v for k, v in settings.items() if v is not None})
        except (TypeError, ValueError) as e:
            raise ValueError(f"method {cls.name!r}: {e}") from None

    def settings(self) -> Dict[str, object]:
        """The settings this method was built with (for logs and the job's record)."""
        return {}

    def attach(self, site: SiteContract):
        """Called once the site's bundle is parsed, before its saved state is restored."""
        self.site = site

    # ------------------------------------------------------------------ a round
    @property
    def exchanged_network(self) -> torch.nn.Module:
        """The model whose weights the site sends and the server's answer replaces."""
        return self.site.network

    def receive(self, weights: Mapping[str, torch.Tensor], meta: Mapping[str, object]):
        """Take the server's answer: the global weights replace the model's shared keys."""
        self.site.load_weights(weights)

    def optimizers(self) -> List[torch.optim.Optimizer]:
        """Every optimizer local training steps (the round's learning rate is set on each; PRR-FL adds its
        deputy's)."""
        return [self.site.optimizer]

    def prepare(self):
        """Work before the round-start score (nothing for FedAvg)."""

    def training_loss(self, base_loss: torch.nn.Module) -> torch.nn.Module:
        """The loss local training minimizes this round (the bundle's own for FedAvg)."""
        return base_loss

    def before_training(self):
        """Right before local training."""

    def after_training(self):
        """Right after local training, before the site saves its state."""

    def after_round(self, key_metric: str) -> RoundNotes:
        """Extra work and scores once local training is done (nothing for FedAvg)."""
        return RoundNotes()

    def outgoing(self) -> Tuple[Dict[str, torch.Tensor], Dict[str, object]]:
        """What the site sends: the exchanged model's shared weights, and extra meta for the server."""
        return self.site.shared_weights(), {}

    # ------------------------------------------------------------------ state
    def state_dict(self) -> Dict[str, object]:
        """The method's own state, saved with the site's (tensors, numbers, lists)."""
        return {}

    def load_state_dict(self, state: Mapping[str, object]):
        """Restore :meth:`state_dict`'s output (called only when the site has saved state)."""
