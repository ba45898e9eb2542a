"""IOP-FL outside personalization: a network whose every convolution routes over a pool of experts.

Given K + 1 trained copies of one architecture (the sites' personalized models and the
global model, global last), :func:`build_routed_network` returns a copy of the anchor
expert (default: the global model) in which every ``nn.Conv{1,2,3}d`` and
``nn.ConvTranspose{1,2,3}d`` becomes a :class:`RoutedConv`: per sample, a small gate on
the layer's input picks mixing weights r (B, K + 1) and the layer convolves with
``sum_e r_e W_e`` (CondConv style). Choices, and why they differ from the released code:

* every expert enters every routed layer (the released code drops one site in most layers);
* the gate ends in a softmax, so the weights sum to 1: a one-hot gate reproduces that
  expert's convolution exactly and identical experts reproduce the single model for any
  gate; the released gate's sigmoid rescales kernels instead (``gate="released"`` is that
  gate, for the released protocol; ``gate="sigmoid"`` is ours with only the output changed);
* the gate's last layer starts at zero, so routing starts as the uniform mean of the
  experts' kernels and adaptation moves away from it (the released gate starts random);
* the gate has no dropout, and the network's own dropout layers are removed: scoring is
  deterministic (the released code scores with dropout on);
* expert kernels are buffers (frozen by construction); gates and normalization affine
  parameters are the only trainable tensors; normalization uses the batch's statistics.

No NVFlare import; no labels anywhere.
"""

from __future__ import annotations

import copy
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fedharmony.core.norm_layers import NORM_TYPES

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
CONV_TRANSPOSE_TYPES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
GATE_ACTIVATIONS = ("softmax", "sigmoid", "released")
RELEASED_GATE_DROPOUT = 0.2
DROPOUT_TYPES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)


class ExpertGate(nn.Module):
    """Per-sample expert weights from a feature map: (B, C, *spatial) -> (B, E), rows summing to 1.

    ``softmax`` (ours): global average pool -> Linear(C, hidden_ratio * C) -> ReLU -> Linear(., E)
    -> softmax, the last layer starting at zero (uniform weights).
    ``sigmoid``: the same with a sigmoid output (independent weights in (0, 1), not summing to 1).
    ``released``: the released code's gate: pool -> Linear -> dropout 0.2 -> Linear -> sigmoid, no
    ReLU between the two linear layers, both randomly initialized (PyTorch's default); the dropout
    acts in training mode (adaptation), not when scoring.
    ``fixed`` (E,) overrides the gate (e.g. one-hot to score one expert through the routed network).
    """

    def __init__(self, in_channels: int, num_experts: int, hidden_ratio: int = 2, activation: str = "softmax"):
        super().__init__()
        if num_experts < 2:
            raise ValueError(f"routing needs at least 2 experts, got {num_experts}")
        if activation not in GATE_ACTIVATIONS:
            raise ValueError(f"gate activation must be one of {GATE_ACTIVATIONS}, got {activation!r}")
        self.activation = activation
        hidden = max(1, hidden_ratio * in_channels)
        self.fc1 = nn.Linear(in_channels, hidden)
        self.fc2 = nn.Linear(hidden, num_experts)
        if activation != "released":
            nn.init.zeros_(self.fc2.weight)
            nn.init.zeros_(self.fc2.bias)
        self.num_experts = num_experts
        self.fixed: Optional[torch.Tensor] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fixed is not None:
            return self.fixed.to(x.device, x.dtype).expand(x.shape[0], -1)
        pooled = x.mean(dim=tuple(range(2, x.ndim)))
        if self.activation == "released":  # functional dropout: remove_dropout() leaves it in place
            return torch.sigmoid(self.fc2(F.dropout(self.fc1(pooled), RELEASED_GATE_DROPOUT, self.training)))
        logits = self.fc2(torch.relu(self.fc1(pooled)))
        return torch.softmax(logits, dim=1) if self.activation == "softmax" else torch.sigmoid(logits)


class RoutedConv(nn.Module):
    """A convolution (or transposed convolution) whose kernel is a per-sample mix of E experts' kernels.

    Input (B, C_in, *spatial) -> output as the experts' layer would give it. The experts'
    weights (E, *W.shape) and biases (E, C_out) are buffers: they never train. The
    per-sample kernels run as one grouped convolution (the batch folded into groups), with
    no Python loop over samples.

    Args:
        experts: the same layer taken from each expert model (same type and hyperparameters).
        hidden_ratio, gate: the gate's hidden width (x input channels) and final activation.
    """

    def __init__(self, experts: Sequence[nn.Module], hidden_ratio: int = 2, gate: str = "softmax"):
        super().__init__()
        ref = experts[-1]
        if not isinstance(ref, CONV_TYPES + CONV_TRANSPOSE_TYPES):
            raise TypeError(f"RoutedConv routes convolutions, got {type(ref).__name__}")
        for e in experts:
            if type(e) is not type(ref) or e.weight.shape != ref.weight.shape or (e.bias is None) != (ref.bias is None):
                raise ValueError(f"experts' layers differ: {type(e).__name__}{tuple(e.weight.shape)} vs "
                                 f"{type(ref).__name__}{tuple(ref.weight.shape)}")
        if ref.padding_mode != "zeros":
            raise NotImplementedError(f"padding_mode {ref.padding_mode!r} is not supported by routing")
        self.transposed = isinstance(ref, CONV_TRANSPOSE_TYPES)
        self.spatial_dims = len(ref.kernel_size)
        self._conv = {1: (F.conv1d, F.conv_transpose1d), 2: (F.conv2d, F.conv_transpose2d),
                      3: (F.conv3d, F.conv_transpose3d)}[self.spatial_dims][int(self.transposed)]
        for attr in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups"):
            setattr(self, attr, getattr(ref, attr))
        self.output_padding = getattr(ref, "output_padding", 0)
        self.register_buffer("expert_weight", torch.stack([e.weight.detach().clone() for e in experts]))
        bias = torch.stack([e.bias.detach().clone() for e in experts]) if ref.bias is not None else None
        self.register_buffer("expert_bias", bias)
        self.gate = ExpertGate(ref.in_channels, len(experts), hidden_ratio, gate)
        self.last_weights: Optional[torch.Tensor] = None  # (B, E) of the last forward, for logs

    @property
    def num_experts(self) -> int:
        return self.expert_weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.gate(x)  # (B, E)
        self.last_weights = r.detach()
        weight = torch.tensordot(r, self.expert_weight, dims=1)  # (B, *W.shape)
        bias = r @ self.expert_bias if self.expert_bias is not None else None  # (B, C_out)
        b = x.shape[0]
        conv = self._conv
        folded = x.reshape(1, b * x.shape[1], *x.shape[2:])
        w = weight.reshape(b * weight.shape[1], *weight.shape[2:])
        bias = bias.reshape(-1) if bias is not None else None
        if self.transposed:
            y = conv(folded, w, bias, self.stride, self.padding, self.output_padding, b * self.groups, self.dilation)
        else:
            y = conv(folded, w, bias, self.stride, self.padding, self.dilation, b * self.groups)
        return y.reshape(b, -1, *y.shape[2:])

    def extra_repr(self) -> str:
        kind = "transposed " if self.transposed else ""
        return (f"{kind}{self.spatial_dims}d {self.in_channels}->{self.out_channels}, kernel {self.kernel_size}, "
                f"{self.num_experts} experts")


def _set_submodule(root: nn.Module, name: str, module: nn.Module):
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def use_batch_statistics(network: nn.Module) -> nn.Module:
    """Normalization layers normalize with the current batch's statistics, in train and eval mode (TENT)."""
    for m in network.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.track_running_stats = False
            m.running_mean = None
            m.running_var = None
            m.num_batches_tracked = None
    return network


def remove_dropout(network: nn.Module) -> nn.Module:
    """Replace every dropout layer by identity, so scoring is deterministic in any mode."""
    for name, m in list(network.named_modules()):
        if name and isinstance(m, DROPOUT_TYPES):
            _set_submodule(network, name, nn.Identity())
    return network


def train_only(network: nn.Module, gates: bool = True, norm_affine: bool = True) -> List[str]:
    """Freeze every parameter except gates and/or normalization affine ones; returns the trainable names."""
    norm_params = {id(p) for m in network.modules() if isinstance(m, NORM_TYPES) for p in m.parameters(recurse=False)}
    gate_params = {id(p) for m in network.modules() if isinstance(m, ExpertGate) for p in m.parameters()}
    names = []
    for name, p in network.named_parameters():
        p.requires_grad_((gates and id(p) in gate_params) or (norm_affine and id(p) in norm_params))
        if p.requires_grad:
            names.append(name)
    return names


def build_routed_network(experts: Sequence[nn.Module], anchor: int = -1, hidden_ratio: int = 2,
                         gate: str = "softmax", batch_stats: bool = True) -> nn.Module:
    """Route every convolution of ``experts[anchor]``'s architecture over all experts.

    Args:
        experts: K + 1 networks of one architecture (by convention the global model last).
        anchor: the expert whose non-convolution parts (normalization affine, buffers such
            as HarmoFL's amplitude target) the routed network starts from.
        hidden_ratio: gate hidden width as a multiple of the layer's input channels.
        gate: ``softmax`` (weights sum to 1), ``sigmoid`` or ``released`` (see :class:`ExpertGate`).
        batch_stats: normalize with the batch's statistics (IOP-FL, TENT); False keeps the
            anchor's running statistics, which adaptation then never changes.

    Returns:
        A new network (the experts are not modified): convolutions routed, normalization
        on batch statistics (unless ``batch_stats=False``), dropout removed, only gates and
        norm affine trainable.

    Raises:
        ValueError: fewer than 2 experts, or experts whose state dicts differ in keys or shapes.
    """
    from fedharmony.methods.iopfl.model_pool import check_same_architecture

    if len(experts) < 2:
        raise ValueError(f"routing needs at least 2 experts, got {len(experts)}")
    check_same_architecture({f"expert {i}": e.state_dict() for i, e in enumerate(experts)})
    net = copy.deepcopy(experts[anchor])
    layers = [dict(e.named_modules()) for e in experts]
    routed = 0
    for name, module in list(net.named_modules()):
        if isinstance(module, CONV_TYPES + CONV_TRANSPOSE_TYPES):
            _set_submodule(net, name, RoutedConv([lay[name] for lay in layers], hidden_ratio, gate))
            routed += 1
    if routed == 0:
        raise ValueError(f"{type(net).__name__} has no convolution to route")
    if batch_stats:
        use_batch_statistics(net)
    remove_dropout(net)
    train_only(net, gates=True, norm_affine=True)
    return net.to(next(iter(experts[anchor].state_dict().values())).device)


def train_keeping_statistics(network: nn.Module) -> nn.Module:
    """``network.train()``, except normalization layers that keep running statistics stay in
    eval mode: test-time adaptation trains gates / affine parameters but never re-estimates
    the source statistics (layers on batch statistics are unaffected)."""
    network.train()
    for m in network.modules():
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats:
            m.eval()
    return network


def routed_layers(network: nn.Module) -> List[RoutedConv]:
    return [m for m in network.modules() if isinstance(m, RoutedConv)]


def set_fixed_routing(network: nn.Module, weights: Optional[Sequence[float]]):
    """Force every gate to ``weights`` (E,) (None restores the learned gates)."""
    for layer in routed_layers(network):
        layer.gate.fixed = None if weights is None else torch.as_tensor(weights, dtype=torch.float32)


def last_routing_weights(network: nn.Module) -> torch.Tensor:
    """(layers, E): each routed layer's expert weights in the last forward, averaged over its batch."""
    rows = [layer.last_weights.mean(0) for layer in routed_layers(network) if layer.last_weights is not None]
    if not rows:
        raise RuntimeError("no routed layer has run yet")
    return torch.stack(rows)
