"""Networks wrapped with HarmoFL's amplitude normalization as their first layer."""

from __future__ import annotations

import logging
from typing import Optional, Sequence

import torch
from torch import nn

from fedharmony.methods.harmofl.harmonize import (amplitude_normalize, batch_amplitude, check_ratio, empty_window_note,
                                                  shape_text, window_radius)

logger = logging.getLogger(__name__)

MODES = ("paper", "released", "off")


class AmplitudeNormalization(nn.Module):
    """Harmonize inputs (B, C, H, W) to the amplitude spectrum held in the ``target`` buffer.

    ``target`` (C, H, W) is part of the state dict, so the server averages it like the
    weights and it travels in every checkpoint; inference normalizes to it with no
    federation around.

    Modes:
      * ``paper``: window ratio ``ratio`` (> 0); during training ``target`` is an
        exponential moving average (``momentum``) of training-batch amplitudes, until
        the site receives a global target (:meth:`use_global_target`); from then on it
        is fixed.
      * ``released``: what the released code effectively does: ratio 0 (DC only, a
        per-channel mean shift) and the target frozen at the first training batch.
      * ``off``: identity (the "perturbation only" ablation keeps the same state-dict keys).
    Evaluation and inference never change the target.

    The layer compiles with ``torch.jit.script`` (MONAI's ``ckpt_export``); a scripted layer
    always uses the torch FFT backend (see :mod:`fedharmony.methods.harmofl.harmonize`).

    Args:
        num_channels, spatial_size: shape of the inputs (and of the target).
        ratio: window ratio L in [0, 0.5] (``released`` forces 0).
        momentum: EMA momentum in (0, 1].
        mode: ``paper`` or ``released``.
        target: a target (C, H, W) to start with instead of none, e.g. a checkpoint's
            ``harmonize.target``, or any non-negative spectrum to try the network's shapes
            without a checkpoint (``python -m monai.bundle verify_net_in_out``). Training treats
            it as a target the layer computed itself (``paper``: moving average; ``released``: fixed).
    """

    def __init__(self, num_channels: int, spatial_size: Sequence[int], ratio: float = 0.01, momentum: float = 0.1,
                 mode: str = "paper", target: Optional[torch.Tensor] = None):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"amplitude normalization mode must be one of {MODES}, got {mode!r}")
        check_ratio(ratio)
        if not 0.0 < momentum <= 1.0:
            raise ValueError(f"momentum must be in (0, 1], got {momentum}")
        self.mode = mode
        self.ratio = 0.0 if mode == "released" else float(ratio)
        self.momentum = float(momentum)
        h, w = spatial_size
        self.window_radius = window_radius(h, w, self.ratio)  # b: the window is (2b + 1) x (2b + 1) frequencies
        note = empty_window_note(h, w, self.ratio) if mode == "paper" else None
        if note:  # said where the network is built (each site, the server): a setting, not an error
            logger.warning("HarmoFL paper mode: %s", note)
        self.register_buffer("target", torch.zeros(num_channels, h, w))
        self.frozen = False  # not in the state dict: a site re-derives it from what it receives
        if target is not None:
            target = torch.as_tensor(target)
            if target.shape != self.target.shape:
                raise ValueError(f"target must be (C, H, W) = {shape_text(self.target.shape)}, "
                                 f"got {shape_text(target.shape)}")
            if not bool(torch.isfinite(target).all()) or bool((target < 0).any()):
                raise ValueError("target must be a finite, non-negative amplitude spectrum")
            self.target.copy_(target)
            self.frozen = mode == "released"

    @property
    def has_target(self) -> bool:
        return bool(self.target.abs().sum() > 0)

    def use_global_target(self):
        """Called when a site receives the server's model: a non-zero target is the global one, keep it."""
        if self.has_target:
            self.frozen = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "off":
            return x
        if x.shape[1:] != self.target.shape:
            raise ValueError(f"amplitude normalization expects inputs (B, {shape_text(self.target.shape)[1:]}, "
                             f"got {shape_text(x.shape)}; resize inputs to the network's spatial size")
        if self.training and not self.frozen:
            with torch.no_grad():
                amp = batch_amplitude(x).to(self.target.dtype)
                if not self.has_target:
                    self.target.copy_(amp)
                    self.frozen = self.mode == "released"
                else:
                    self.target.mul_(1 - self.momentum).add_(amp, alpha=self.momentum)
        if not self.has_target:
            raise RuntimeError("amplitude normalization has no target yet: train the model first or load a "
                               "checkpoint that holds one")
        return amplitude_normalize(x, self.target, self.ratio)


class HarmonizedNetwork(nn.Module):
    """``network(amplitude_normalization(x))``: any 2D network with HarmoFL's first layer.

    Args:
        network: the bundle's network (e.g. a MONAI UNet).
        num_channels, spatial_size, ratio, momentum, mode, target: see :class:`AmplitudeNormalization`.
    """

    def __init__(self, network: nn.Module, num_channels: int, spatial_size: Sequence[int], ratio: float = 0.01,
                 momentum: float = 0.1, mode: str = "paper", target: Optional[torch.Tensor] = None):
        super().__init__()
        self.harmonize = AmplitudeNormalization(num_channels, spatial_size, ratio, momentum, mode, target)
        self.network = network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(self.harmonize(x))


def use_global_targets(model: nn.Module):
    """Fix every amplitude target in ``model`` to the value just received from the server."""
    for m in model.modules():
        if isinstance(m, AmplitudeNormalization):
            m.use_global_target()


def layers_without_target(model: nn.Module):
    return [m for m in model.modules() if isinstance(m, AmplitudeNormalization) and m.mode != "off" and not m.has_target]


def prime_targets(model: nn.Module, training_images: torch.Tensor) -> int:
    """Give every amplitude layer that has none a target from a *training* batch (B, C, H, W).

    A site scores the server's initial model before it has trained a step; the card only
    allows training data to shape the target, so the first training batch is used (as the
    first training step would). Returns how many layers were primed.
    """
    layers = layers_without_target(model)
    for m in layers:
        with torch.no_grad():
            m.target.copy_(batch_amplitude(training_images.to(m.target.device)).to(m.target.dtype))
    return len(layers)
