"""One site's copy of a MONAI bundle, driven round by round (no NVFlare import, no method named).

Why not ``monai.fl.client.MonaiAlgo``: it rebuilds the optimizer and epoch counter
every time the process starts, has no notion of keys that stay local, and reads model
weights back from checkpoint files. A federated site here must keep its optimizer
state, local layers (FedBN) and best model across rounds *and* process restarts, so
this class parses the same bundle config with MONAI's ``ConfigWorkflow`` and keeps
that state in one file on the site's disk.

What a federated method does differently is not here: the site holds a
:class:`fedharmony.methods.SiteMethod` (chosen by name) and :meth:`BundleSite.run_round`
calls it at fixed points of the round.

Config ids used: ``train#trainer`` (a ``SupervisedTrainer``), ``validate#evaluator``
and ``test#evaluator`` (``SupervisedEvaluator``; its key metric, e.g. ``val_mean_dice``
or ``val_macro_f1``, is the site's score), ``train#handlers`` and ``validate#handlers``
(replaced: the server drives validation), ``iteration_update`` (optional: the trainer's
iteration function, which a method may need, e.g. PRR-FL's deputy transfer).
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Union

import torch
from monai.bundle import ConfigWorkflow

from fedharmony.core.aggregation import is_local_key
from fedharmony.core.files import atomic_torch_save
from fedharmony.methods import SiteMethod, make_site_method
from fedharmony.core.results import AFTER_TRAINING_SUFFIX, EXCHANGED_SUFFIX
from fedharmony.bundle.networks import ConfigFiles, build_network, config_paths  # noqa: F401 (build_network: re-exported)
from fedharmony.bundle.optim import RoundSchedule

logger = logging.getLogger(__name__)

STATE_FILE = "site_state.pt"
BEST_MODEL_FILE = "best_model.pt"

# In a federation the server decides when to validate: no ValidationHandler / CheckpointSaver.
FL_OVERRIDES = {
    "train#handlers": [
        {"_target_": "StatsHandler", "tag_name": "train_loss", "iteration_log": False,
         "output_transform": "$monai.handlers.from_engine(['loss'], first=True)"}
    ],
    "validate#handlers": [],
}




@dataclass
class RoundReport:
    """One round on one site: what to send, and what to log and track.

    Attributes:
        key_metric: the bundle's key validation metric name (``val_mean_dice``).
        metrics: the round-start scores of the site's model (the received one, with local keys).
        tracked: scalars to track this round (the key metric, plus the method's extras).
        per_epoch: scalars with one value per local epoch.
        note: the method's text for the log line.
        steps: local training iterations.
        weights, meta: what the site sends.
        eval_seconds, seconds: time of the round-start scoring, and of the whole round.
    """

    key_metric: str
    metrics: Dict[str, float]
    tracked: Dict[str, float]
    per_epoch: Dict[str, List[float]] = field(default_factory=dict)
    note: str = ""
    steps: int = 0
    weights: Dict[str, torch.Tensor] = field(default_factory=dict)
    meta: Dict[str, object] = field(default_factory=dict)
    eval_seconds: float = 0.0
    seconds: float = 0.0


class BundleSite:
    """Train and evaluate a bundle's network on one site's data, one federated round at a time.

    Args:
        bundle_root: folder of the MONAI bundle (``configs/train.json`` inside).
        dataset_dir: the site's data folder (``datalist.json`` inside, unless overridden).
        state_dir: where the site keeps its state between rounds and restarts.
        site_name: for logs and error messages.
        overrides: extra ``ConfigWorkflow`` overrides (e.g. ``{"learning_rate": 1e-3}``).
        config_file: bundle config(s) to parse, relative to ``bundle_root``; a list is
            layered in order (e.g. ``["configs/train.json", "configs/harmofl.json"]``).
        method: the federated method, by name (``fedavg``, ``fedbn``, ... see
            :data:`fedharmony.methods.METHODS`) or as a :class:`~fedharmony.methods.SiteMethod`.
        method_settings: the method's settings when ``method`` is a name (``{"mu": 0.01}``).

    Example (one FedAvg round, without a server)::

        site = BundleSite("bundles/prostate_mri_seg", "data/prostate/BIDMC", "/tmp/state", "BIDMC")
        report = site.run_round(global_weights, {}, local_epochs=1)   # report.weights: what to send
    """

    def __init__(self, bundle_root: str, dataset_dir: str, state_dir: str, site_name: str = "site",
                 overrides: Optional[dict] = None, config_file: ConfigFiles = "configs/train.json",
                 method: Union[str, SiteMethod] = "fedavg", method_settings: Optional[Mapping[str, object]] = None):
        self.site_name = site_name
        self.method: SiteMethod = method if isinstance(method, SiteMethod) else make_site_method(method,
                                                                                                 method_settings)
        self.local_keys = self.method.local_keys or None
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        try:
            configs = config_paths(bundle_root, config_file)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"site {site_name!r}: {e}") from None
        self.workflow = ConfigWorkflow(
            config_file=configs,
            workflow_type="train",
            logging_file=False,
            bundle_root=str(bundle_root),
            dataset_dir=str(dataset_dir),
            ckpt_dir=str(self.state_dir),
            output_dir=str(self.state_dir / "eval"),
            **{**FL_OVERRIDES, **(overrides or {})},
        )
        self.workflow.initialize()
        self.trainer = self.workflow.parser.get_parsed_content("train#trainer")
        self.network: torch.nn.Module = self.trainer.network
        self.optimizer: torch.optim.Optimizer = self.trainer.optimizer
        self.base_loss = self.trainer.loss_function
        self._evaluators = {}
        parser = self.workflow.parser
        self.iteration_update = parser.get_parsed_content("iteration_update") if "iteration_update" in parser else None
        try:  # the learning rate by round (fedharmony.bundle.optim); the bundles' defaults change nothing
            self.round_schedule = RoundSchedule(
                self.optimizer.defaults["lr"], parser.get_parsed_content("lr_round_gamma", default=1.0),
                parser.get_parsed_content("lr_round_step", default=1),
                parser.get_parsed_content("optimizer_reset_each_round", default=False))
        except ValueError as e:
            raise ValueError(f"site {site_name!r}: {e}") from None
        self.round = 0
        self.last_local_epochs = 0
        self.best_metric = float("-inf")
        self.best_round = -1
        local = [k for k in self.network.state_dict() if is_local_key(k, self.local_keys)]
        if self.local_keys and not local:
            raise ValueError(f"site {site_name!r}: method {self.method.name!r} keeps keys matching "
                             f"{self.local_keys!r} local, but no key of the network matches")
        self.local_key_names = local
        self.method.attach(self)
        self._load_state()

    @property
    def key_metric(self) -> str:
        """Name of the bundle's key validation metric (``val_mean_dice``, ``val_macro_f1``, ...)."""
        return self.evaluator("validation").state.key_metric_name

    @property
    def num_train_cases(self) -> int:
        """Training volumes on this site (the FedAvg sample weight)."""
        return len(self.trainer.data_loader.dataset)

    # ------------------------------------------------------------------ weights
    def state_dict(self) -> Dict[str, torch.Tensor]:
        """The site's full model (shared + local keys), on the CPU."""
        return {k: v.detach().cpu().clone() for k, v in self.network.state_dict().items()}

    def shared_weights(self) -> Dict[str, torch.Tensor]:
        """Every key of the exchanged model (the method's; PRR-FL: the deputy) except the local ones."""
        return {k: v.detach().cpu().clone() for k, v in self.method.exchanged_network.state_dict().items()
                if not is_local_key(k, self.local_keys)}

    def load_weights(self, weights: Mapping[str, object], keep_local: bool = True,
                     network: Optional[torch.nn.Module] = None):
        """Copy received weights into ``network`` (default: the site's model); local keys stay the site's own.

        Raises:
            KeyError / ValueError: a received key is unknown or has the wrong shape.
        """
        own = (network or self.network).state_dict()
        unknown = sorted(set(weights) - set(own))
        if unknown:
            raise KeyError(f"site {self.site_name!r}: received weights with keys the bundle's network "
                           f"does not have: {unknown[:5]}")
        with torch.no_grad():
            for k, v in weights.items():
                if keep_local and is_local_key(k, self.local_keys):
                    continue
                t = torch.as_tensor(v)
                if tuple(t.shape) != tuple(own[k].shape):
                    raise ValueError(f"site {self.site_name!r}: received {k!r} with shape {tuple(t.shape)}, "
                                     f"the network has {tuple(own[k].shape)}")
                own[k].copy_(t.to(own[k].dtype))

    def receive(self, weights: Mapping[str, object], meta: Optional[Mapping[str, object]] = None):
        """Take the server's answer for this round, as the method says (default: load the global weights)."""
        self.method.receive(weights, dict(meta or {}))

    @contextlib.contextmanager
    def weights_applied(self, weights: Optional[Mapping[str, object]], keep_local: bool = True):
        """Temporarily score other weights (cross-site evaluation) without touching the site's model
        (``keep_local=False``: the weights' own local keys too, e.g. another network's norm layers)."""
        if weights is None:
            yield
            return
        saved = self.state_dict()
        try:
            self.load_weights(weights, keep_local=keep_local)
            yield
        finally:
            self.load_weights(saved, keep_local=False)

    # ------------------------------------------------------------------ a federated round
    def run_round(self, weights: Mapping[str, object], meta: Optional[Mapping[str, object]], local_epochs: int,
                  score_after_training: bool = False) -> RoundReport:
        """One round: take the server's answer, score it, train, and say what to send.

        Args:
            weights: the server's answer (``{key: tensor}``; the global model, for most methods).
            meta: what came with it (the method reads its own keys).
            local_epochs: epochs of local training.
            score_after_training: also score the site's model after local training
                (tracked as ``<key metric>_after_training``); where the method exchanges another
                network than the one the site uses (PRR-FL's deputy), score that one too, right
                after it took the answer and after local training (``<key metric>_exchanged``,
                ``<key metric>_exchanged_after_training``): where the communication's cost goes.
        """
        t0 = time.time()
        method = self.method
        self.receive(weights, meta)
        method.prepare()
        key = self.key_metric
        metrics = self.evaluate(None, "validation")  # the model the site now uses (with its local keys)
        if method.best_at_round_start:
            self.record_metric(metrics[key])
        score_exchanged = score_after_training and method.exchanged_network is not self.network
        exchanged = {key + EXCHANGED_SUFFIX: self.score_exchanged()} if score_exchanged else {}
        t_eval = time.time() - t0
        steps = self.train(None, local_epochs)
        notes = method.after_round(key)
        tracked = {key: metrics[key], **exchanged, **notes.tracked}
        note = notes.note
        if score_after_training or method.scores_after_training:
            with torch.random.fork_rng():  # leaves the training RNG stream untouched
                after = self.evaluate(None, "validation")[key]
            tracked[key + AFTER_TRAINING_SUFFIX] = after
            note = f", after training {after:.4f}" + note
            if method.best_after_training:
                self.record_metric(after)
        if score_exchanged:
            tracked[key + EXCHANGED_SUFFIX + AFTER_TRAINING_SUFFIX] = self.score_exchanged()
        self.save_state()  # the method's state and the best score, for a site process that restarts
        out_weights, out_meta = method.outgoing()
        return RoundReport(key_metric=key, metrics=metrics, tracked=tracked, per_epoch=notes.per_epoch, note=note,
                           steps=steps, weights=out_weights, meta=out_meta, eval_seconds=t_eval,
                           seconds=time.time() - t0)

    # ------------------------------------------------------------------ train / evaluate
    def run_epochs(self, epochs: int, loss: Optional[torch.nn.Module] = None) -> int:
        """Run the bundle's trainer for ``epochs`` more epochs with ``loss`` (default: the bundle's);
        returns the iterations run. Counts no round and saves nothing."""
        if epochs < 1:
            raise ValueError(f"local_epochs must be >= 1, got {epochs}")
        self.trainer.loss_function = loss if loss is not None else self.base_loss
        state = self.trainer.state
        start_iteration = state.iteration
        state.max_epochs = state.epoch + epochs
        try:
            self.trainer.run()
        finally:
            self.trainer.loss_function = self.base_loss
        return self.trainer.state.iteration - start_iteration

    def train(self, global_weights: Optional[Mapping[str, object]], local_epochs: int) -> int:
        """One round of local training (from ``global_weights`` when given), as the method says;
        returns the iterations run and saves the site's state."""
        if local_epochs < 1:
            raise ValueError(f"local_epochs must be >= 1, got {local_epochs}")
        if global_weights is not None:
            self.load_weights(global_weights)
        lr = self.round_schedule.apply(self.method.optimizers(), self.round)
        if self.round_schedule.active:
            logger.info("site %s: round %d trains at learning rate %g%s", self.site_name, self.round, lr,
                        " (optimizers reset)" if self.round_schedule.reset_each_round else "")
        loss = self.method.training_loss(self.base_loss)
        self.method.before_training()
        steps = self.run_epochs(local_epochs, loss)
        self.round += 1
        self.last_local_epochs = local_epochs
        self.method.after_training()
        self.save_state()
        return steps

    def evaluator(self, split: str):
        """``validation`` -> ``validate#evaluator``, ``testing`` -> ``test#evaluator`` (built on first use)."""
        config_id = {"validation": "validate#evaluator", "testing": "test#evaluator"}.get(split)
        if config_id is None:
            raise ValueError(f"unknown split {split!r}; use 'validation' or 'testing'")
        if split not in self._evaluators:
            self._evaluators[split] = self.workflow.parser.get_parsed_content(config_id)
        return self._evaluators[split]

    def evaluate(self, weights: Optional[Mapping[str, object]] = None, split: str = "validation") -> Dict[str, float]:
        """Score ``weights`` (default: the site's current model) on one split; returns ``{val_mean_dice: ...}``."""
        evaluator = self.evaluator(split)
        with self.weights_applied(weights):
            evaluator.run()
        return {k: float(v) for k, v in evaluator.state.metrics.items()}

    def score_exchanged(self) -> float:
        """The key metric on the validation split of the network the method exchanges, with its own norm
        layers (PRR-FL: the deputy), scored in the site's network and put back; the RNG stream is untouched."""
        exchanged = {k: v.detach().cpu().clone() for k, v in self.method.exchanged_network.state_dict().items()}
        with torch.random.fork_rng(), self.weights_applied(exchanged, keep_local=False):
            return self.evaluate(None, "validation")[self.key_metric]

    def record_metric(self, metric: float, weights: Optional[Mapping[str, torch.Tensor]] = None):
        """Keep the best model seen by this site (scored on its validation split) on disk.

        ``weights`` is the model that scored ``metric`` (default: the site's current model;
        IOP-FL and Ditto pass their personalized model).
        """
        if metric > self.best_metric:
            self.best_metric, self.best_round = metric, self.round
            atomic_torch_save(dict(weights) if weights is not None else self.state_dict(), self.state_dir / BEST_MODEL_FILE)

    def best_model(self) -> Dict[str, torch.Tensor]:
        path = self.state_dir / BEST_MODEL_FILE
        return torch.load(path, map_location="cpu", weights_only=True) if path.is_file() else self.state_dict()

    # ------------------------------------------------------------------ persistence
    def save_state(self):
        atomic_torch_save({
            "network": self.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "epoch": self.trainer.state.epoch,
            "iteration": self.trainer.state.iteration,
            "round": self.round,
            "best_metric": self.best_metric,
            "best_round": self.best_round,
            "method": {"name": self.method.name, "state": self.method.state_dict()},
        }, self.state_dir / STATE_FILE)

    def _load_state(self):
        path = self.state_dir / STATE_FILE
        if not path.is_file():
            return
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            saved_method = (state.get("method") or {}).get("name")
            if saved_method != self.method.name:
                raise ValueError(f"the saved state is a {saved_method or 'older version'} site's; this job runs "
                                 f"{self.method.name}")
            self.network.load_state_dict(state["network"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.method.load_state_dict(state["method"]["state"] or {})
        except Exception as e:
            raise RuntimeError(f"site {self.site_name!r}: cannot restore state from {path} ({e}); "
                               "move the file away to start this site fresh") from e
        self.trainer.state.epoch = state["epoch"]
        self.trainer.state.iteration = state["iteration"]
        self.round = state["round"]
        self.best_metric, self.best_round = state["best_metric"], state["best_round"]
        logger.info("site %s: restored state from %s (round %d, epoch %d)", self.site_name, path, self.round,
                    state["epoch"])
