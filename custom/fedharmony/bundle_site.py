"""One site's copy of a MONAI bundle, driven round by round (no NVFlare import).

Why not ``monai.fl.client.MonaiAlgo``: it rebuilds the optimizer and epoch counter
every time the process starts, has no notion of keys that stay local, and reads model
weights back from checkpoint files. A federated site here must keep its optimizer
state, local layers (FedBN) and best model across rounds *and* process restarts, so
this class parses the same bundle config with MONAI's ``ConfigWorkflow`` and keeps
that state in one file on the site's disk.

Config ids used: ``train#trainer`` (a ``SupervisedTrainer``), ``validate#evaluator``
and ``test#evaluator`` (``SupervisedEvaluator``; its key metric, e.g. ``val_mean_dice``
or ``val_macro_f1``, is the site's score), ``train#handlers`` and ``validate#handlers``
(replaced: the server drives validation), ``iteration_update`` (PRR-FL: a
:class:`fedharmony.deputy.DeputyTransferIteration` makes this a two-model site).
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Union

import torch
from monai.bundle import ConfigWorkflow

from .aggregation import is_local_key
from .deputy import DeputyTransferIteration
from .fourier_aggregation import mix_amplitudes
from .losses import ProximalLoss
from .personalization import check_personalization_alpha, ema_update

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


ConfigFiles = Union[str, Sequence[str]]


def config_paths(bundle_root: str, config_file: ConfigFiles) -> List[str]:
    """Bundle config file(s), relative to ``bundle_root``, as existing absolute paths (later files override)."""
    files = [config_file] if isinstance(config_file, str) else list(config_file)
    paths = [Path(bundle_root) / f for f in files]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing or not paths:
        raise FileNotFoundError(f"bundle config not found: {missing or files}")
    return [str(p) for p in paths]


def _atomic_save(obj, path: Path):
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)  # a crash mid-write never leaves a truncated state file


class BundleSite:
    """Train and evaluate a bundle's network on one site's data, one federated round at a time.

    Args:
        bundle_root: folder of the MONAI bundle (``configs/train.json`` inside).
        dataset_dir: the site's data folder (``datalist.json`` inside, unless overridden).
        state_dir: where the site keeps its state between rounds and restarts.
        site_name: for logs and error messages.
        local_keys: regex of state-dict keys that never leave the site (FedBN: norm layers).
        overrides: extra ``ConfigWorkflow`` overrides (e.g. ``{"learning_rate": 1e-3}``).
        config_file: bundle config(s) to parse, relative to ``bundle_root``; a list is
            layered in order (e.g. ``["configs/train.json", "configs/harmofl.json"]``).
        personalize_alpha: IOP-FL inside personalization: after each round's training the
            site updates its personalized model ``personalized`` with
            :func:`fedharmony.personalization.ema_update` (None = off).
    """

    def __init__(self, bundle_root: str, dataset_dir: str, state_dir: str, site_name: str = "site",
                 local_keys: Optional[str] = None, overrides: Optional[dict] = None,
                 config_file: ConfigFiles = "configs/train.json", personalize_alpha: Optional[float] = None):
        self.site_name = site_name
        self.personalize_alpha = None if personalize_alpha is None else check_personalization_alpha(personalize_alpha)
        self.personalized: Optional[Dict[str, torch.Tensor]] = None
        self.local_keys = local_keys or None
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
        update = parser.get_parsed_content("iteration_update") if "iteration_update" in parser else None
        # PRR-FL: the trainer's network is the personalized model; the deputy is what the site exchanges
        self.deputy_transfer: Optional[DeputyTransferIteration] = (
            update if isinstance(update, DeputyTransferIteration) else None)
        self.round = 0
        self.best_metric = float("-inf")
        self.best_round = -1
        local = [k for k in self.network.state_dict() if is_local_key(k, self.local_keys)]
        if self.local_keys and not local:
            raise ValueError(f"site {site_name!r}: local_keys {self.local_keys!r} matches no key of the network")
        self.local_key_names = local
        self._load_state()

    @property
    def key_metric(self) -> str:
        """Name of the bundle's key validation metric (``val_mean_dice``, ``val_macro_f1``, ...)."""
        return self.evaluator("validation").state.key_metric_name

    @property
    def exchanged_network(self) -> torch.nn.Module:
        """The model the site sends and the server's answer replaces: the deputy under PRR-FL, else the model."""
        return self.deputy_transfer.deputy if self.deputy_transfer is not None else self.network

    @property
    def num_train_cases(self) -> int:
        """Training volumes on this site (the FedAvg sample weight)."""
        return len(self.trainer.data_loader.dataset)

    # ------------------------------------------------------------------ weights
    def state_dict(self) -> Dict[str, torch.Tensor]:
        """The site's full model (shared + local keys), on the CPU."""
        return {k: v.detach().cpu().clone() for k, v in self.network.state_dict().items()}

    def shared_weights(self) -> Dict[str, torch.Tensor]:
        """What the site sends: every key of the exchanged model (the deputy under PRR-FL) except the local ones."""
        return {k: v.detach().cpu().clone() for k, v in self.exchanged_network.state_dict().items()
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

    def receive(self, weights: Mapping[str, object], fourier_ratio: Optional[float] = None):
        """Take the server's answer for this round.

        Without PRR-FL: the global weights replace the model's shared keys. Under PRR-FL
        the answer goes to the deputy only: with ``fourier_ratio`` it is the mean amplitudes
        of :func:`fedharmony.fourier_aggregation.mean_amplitudes`, mixed into the deputy's own
        spectrum; without it (the initial global model) plain weights, which also start the
        personalized model when the site has not trained yet.
        """
        if self.deputy_transfer is None:
            if fourier_ratio is not None:
                raise ValueError(f"site {self.site_name!r}: received a Fourier aggregate but the bundle's "
                                 "trainer is not PRR-FL's (no DeputyTransferIteration)")
            self.load_weights(weights)
            return
        deputy = self.deputy_transfer.deputy
        if fourier_ratio is None:
            self.load_weights(weights, network=deputy)
            if self.round == 0:
                self.load_weights(weights)
            return
        own = {k: v.detach().cpu().numpy() for k, v in deputy.state_dict().items()}
        shared = {k: v for k, v in weights.items() if not is_local_key(k, self.local_keys)}
        try:
            mixed = mix_amplitudes(own, {k: torch.as_tensor(v).numpy() for k, v in shared.items()}, fourier_ratio)
        except ValueError as e:
            raise ValueError(f"site {self.site_name!r}: cannot apply the Fourier aggregate: {e}") from None
        self.load_weights({k: torch.from_numpy(mixed[k]) for k in shared}, network=deputy)

    @contextlib.contextmanager
    def weights_applied(self, weights: Optional[Mapping[str, object]]):
        """Temporarily score other weights (cross-site evaluation) without touching the site's model."""
        if weights is None:
            yield
            return
        saved = self.state_dict()
        try:
            self.load_weights(weights)
            yield
        finally:
            self.load_weights(saved, keep_local=False)

    # ------------------------------------------------------------------ train / evaluate
    def train(self, global_weights: Optional[Mapping[str, object]], local_epochs: int,
              fedprox_mu: Optional[float] = None) -> int:
        """One round of local training from the global weights; returns the iterations run."""
        if local_epochs < 1:
            raise ValueError(f"local_epochs must be >= 1, got {local_epochs}")
        if global_weights is not None:
            self.load_weights(global_weights)
        if fedprox_mu:
            loss = ProximalLoss(self.base_loss, self.network, fedprox_mu)
            loss.set_reference(self.shared_weights())
            self.trainer.loss_function = loss
        else:
            self.trainer.loss_function = self.base_loss
        state = self.trainer.state
        start_iteration = state.iteration
        state.max_epochs = state.epoch + local_epochs
        if self.deputy_transfer is not None:
            self.deputy_transfer.start_round()
        self.trainer.run()
        self.round += 1
        steps = self.trainer.state.iteration - start_iteration
        if self.personalize_alpha is not None:
            self.personalized = ema_update(self.personalized, self.state_dict(), self.personalize_alpha)
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

    def record_metric(self, metric: float, weights: Optional[Mapping[str, torch.Tensor]] = None):
        """Keep the best model seen by this site (scored on its validation split) on disk.

        ``weights`` is the model that scored ``metric`` (default: the site's current model;
        IOP-FL passes the personalized model).
        """
        if metric > self.best_metric:
            self.best_metric, self.best_round = metric, self.round
            _atomic_save(dict(weights) if weights is not None else self.state_dict(), self.state_dir / BEST_MODEL_FILE)

    def best_model(self) -> Dict[str, torch.Tensor]:
        path = self.state_dir / BEST_MODEL_FILE
        return torch.load(path, map_location="cpu", weights_only=True) if path.is_file() else self.state_dict()

    # ------------------------------------------------------------------ persistence
    def save_state(self):
        _atomic_save({
            "network": self.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "epoch": self.trainer.state.epoch,
            "iteration": self.trainer.state.iteration,
            "round": self.round,
            "best_metric": self.best_metric,
            "best_round": self.best_round,
            "personalized": self.personalized,
            "deputy": None if self.deputy_transfer is None else {
                "network": {k: v.detach().cpu().clone() for k, v in self.deputy_transfer.deputy.state_dict().items()},
                "optimizer": self.deputy_transfer.deputy_optimizer.state_dict(),
                "history": list(self.deputy_transfer.history),
            },
        }, self.state_dir / STATE_FILE)

    def _load_state(self):
        path = self.state_dir / STATE_FILE
        if not path.is_file():
            return
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            self.network.load_state_dict(state["network"])
            self.optimizer.load_state_dict(state["optimizer"])
            deputy = state.get("deputy")
            if (deputy is not None) != (self.deputy_transfer is not None):
                kind = "a PRR-FL (personalized + deputy)" if deputy is not None else "a single-model"
                raise ValueError(f"the saved state is {kind} site's; this bundle's trainer is not of that kind")
            if deputy is not None:
                self.deputy_transfer.deputy.load_state_dict(deputy["network"])
                self.deputy_transfer.deputy_optimizer.load_state_dict(deputy["optimizer"])
                self.deputy_transfer.history = [tuple(h) for h in deputy["history"]]
        except Exception as e:
            raise RuntimeError(f"site {self.site_name!r}: cannot restore state from {path} ({e}); "
                               "move the file away to start this site fresh") from e
        self.trainer.state.epoch = state["epoch"]
        self.trainer.state.iteration = state["iteration"]
        self.round = state["round"]
        self.best_metric, self.best_round = state["best_metric"], state["best_round"]
        self.personalized = state.get("personalized")
        logger.info("site %s: restored state from %s (round %d, epoch %d)", self.site_name, path, self.round,
                    state["epoch"])


def build_network(bundle_root: str, config_file: ConfigFiles = "configs/train.json", key: str = "network_def",
                  overrides: Optional[dict] = None, seed: Optional[int] = 0) -> torch.nn.Module:
    """Instantiate the bundle's network definition (no data needed; used by the server).

    ``overrides`` are the same config overrides the sites get (e.g. ``base_features``),
    so server and sites build the same architecture; ``seed`` makes the initial weights
    reproducible (None leaves torch's RNG alone).
    """
    from monai.bundle import ConfigParser

    paths = config_paths(bundle_root, config_file)
    parser = ConfigParser()
    parser.read_config(paths)
    parser["bundle_root"] = str(bundle_root)
    for k, v in (overrides or {}).items():
        parser[k] = v
    if key not in parser:
        raise KeyError(f"{paths} has no {key!r}")
    if seed is not None:
        torch.manual_seed(seed)
    return parser.get_parsed_content(key)
