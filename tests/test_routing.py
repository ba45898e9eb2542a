"""IOP-FL outside personalization: the routed network's math and what it lets train."""

import copy

import pytest
import torch
from monai.networks.nets import UNet
from torch import nn

from fedharmony.methods.iopfl.model_pool import PoolError
from fedharmony.methods.iopfl.routing import (RoutedConv, build_routed_network, last_routing_weights, routed_layers,
                                set_fixed_routing, use_batch_statistics)


def _unet(dropout=0.0):
    return UNet(2, 3, 2, (4, 8, 16, 32, 64), (2, 2, 2, 2), num_res_units=1, norm="batch", dropout=dropout)


def _experts(n=3, dropout=0.0, seed=0):
    """n personalized experts + the global one (last): conv kernels differ, norm layers shared."""
    torch.manual_seed(seed)
    glob = _unet(dropout)
    experts = []
    for _ in range(n):
        e = copy.deepcopy(glob)
        with torch.no_grad():
            for name, p in e.named_parameters():
                if p.ndim > 1:  # conv / transposed-conv kernels only
                    p.add_(0.2 * torch.randn_like(p))
        experts.append(e)
    return experts + [glob]


def _random_gates(net, seed=1):
    g = torch.Generator().manual_seed(seed)
    for layer in routed_layers(net):
        with torch.no_grad():
            layer.gate.fc2.weight.copy_(torch.randn(layer.gate.fc2.weight.shape, generator=g))


def test_every_convolution_and_transposed_convolution_is_routed_over_all_experts():
    experts = _experts(4)
    net = build_routed_network(experts)
    n_conv = sum(isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)) for m in experts[0].modules())
    layers = routed_layers(net)
    assert len(layers) == n_conv and any(layer.transposed for layer in layers)
    assert all(layer.num_experts == 5 for layer in layers)  # none dropped
    assert not any(isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)) for m in net.modules())


@pytest.mark.parametrize("k", [0, 1, 3])
def test_one_hot_gate_reproduces_that_expert(k):
    experts = _experts(3)
    net = build_routed_network(experts).eval()
    one_hot = [0.0] * 4
    one_hot[k] = 1.0
    set_fixed_routing(net, one_hot)
    reference = use_batch_statistics(copy.deepcopy(experts[k])).eval()  # routed nets normalize with batch stats
    x = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(net(x), reference(x))
    set_fixed_routing(net, None)
    assert not torch.allclose(net(x), reference(x), atol=1e-3)  # the learned (uniform) gate mixes


def test_identical_experts_reproduce_the_single_model_for_any_gate():
    model = _unet()
    net = build_routed_network([copy.deepcopy(model) for _ in range(4)]).eval()
    _random_gates(net)
    x = torch.randn(3, 3, 32, 32)
    out = net(x)
    weights = last_routing_weights(net)
    assert weights.std(dim=1).min() > 0.01  # the gates really are not uniform
    torch.testing.assert_close(out, use_batch_statistics(copy.deepcopy(model)).eval()(x))


def test_gate_weights_are_per_sample_and_sum_to_one():
    net = build_routed_network(_experts(2)).eval()
    _random_gates(net)
    net(torch.randn(3, 3, 32, 32) * torch.tensor([0.1, 1.0, 5.0]).view(3, 1, 1, 1))
    for layer in routed_layers(net):
        w = layer.last_weights
        torch.testing.assert_close(w.sum(1), torch.ones(3))
        assert (w[0] - w[2]).abs().max() > 1e-4


def test_only_gates_and_norm_affine_train_and_no_dropout_or_running_stats():
    net = build_routed_network(_experts(2, dropout=0.3))
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trainable and all(".gate." in n or ".adn.N." in n for n in trainable)
    assert any(".gate." in n for n in trainable) and any(".adn.N." in n for n in trainable)
    assert all(p.requires_grad for layer in routed_layers(net) for p in layer.gate.parameters())
    assert all(not layer.expert_weight.requires_grad for layer in routed_layers(net))
    assert not any(isinstance(m, nn.Dropout) for m in net.modules())
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(m.running_mean is None and not m.track_running_stats for m in bns)
    x = torch.randn(2, 3, 32, 32)
    net.eval()
    torch.testing.assert_close(net(x), net(x))  # deterministic when scoring


@pytest.mark.parametrize("make", [
    lambda: nn.Conv1d(4, 6, 3, stride=2, padding=1),
    lambda: nn.Conv3d(4, 6, 3, padding=1, groups=2, bias=False),
    lambda: nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1),
])
def test_routed_conv_equals_a_per_sample_loop(make):
    torch.manual_seed(0)
    layers = [make() for _ in range(3)]
    routed = RoutedConv(layers)
    _random_gates(nn.Sequential(routed))
    spatial = {1: (9,), 2: (7, 7), 3: (5, 5, 5)}[routed.spatial_dims]
    x = torch.randn(2, 4, *spatial)
    y = routed(x)
    r = routed.last_weights
    for b in range(2):
        ref = copy.deepcopy(layers[0])
        with torch.no_grad():
            ref.weight.copy_(sum(r[b, e] * layers[e].weight for e in range(3)))
            if ref.bias is not None:
                ref.bias.copy_(sum(r[b, e] * layers[e].bias for e in range(3)))
        torch.testing.assert_close(y[b:b + 1], ref(x[b:b + 1]), rtol=1e-5, atol=1e-5)


def test_mismatched_experts_are_refused():
    small = UNet(2, 3, 2, (4, 8, 16, 32, 64), (2, 2, 2, 2), num_res_units=1, norm="batch")
    wide = UNet(2, 3, 2, (8, 16, 32, 64, 128), (2, 2, 2, 2), num_res_units=1, norm="batch")
    with pytest.raises(PoolError, match="expert 0"):
        build_routed_network([wide, small])
    with pytest.raises(ValueError, match="at least 2 experts"):
        build_routed_network([small])
    with pytest.raises(ValueError, match="no convolution"):
        build_routed_network([nn.Linear(2, 2), nn.Linear(2, 2)])
    with pytest.raises(NotImplementedError, match="padding_mode"):
        RoutedConv([nn.Conv2d(2, 2, 3, padding_mode="reflect")] * 2)


def test_released_sigmoid_gate_is_available_and_does_not_sum_to_one():
    net = build_routed_network(_experts(2), gate="sigmoid").eval()
    net(torch.randn(2, 3, 32, 32))
    w = last_routing_weights(net)
    torch.testing.assert_close(w, torch.full_like(w, 0.5))  # zero-initialized last layer: sigmoid(0)
    assert w.sum(1).min() > 1.4  # 3 experts x 0.5: kernels are scaled, not mixed
    with pytest.raises(ValueError, match="gate activation"):
        build_routed_network(_experts(2), gate="relu")


def test_the_released_gate_has_no_relu_dropout_while_adapting_and_a_random_start():
    from fedharmony.methods.iopfl.routing import ExpertGate

    torch.manual_seed(0)
    gate = ExpertGate(4, 3, hidden_ratio=2, activation="released")
    assert gate.fc2.weight.abs().sum() > 0  # random start (ours starts at zero: uniform weights)
    x = torch.randn(6, 4, 5, 5)
    pooled = x.mean(dim=(2, 3))
    gate.eval()  # scoring: no dropout; sigmoid(fc2(fc1(pool))) with nothing between the two layers
    expected = torch.sigmoid(gate.fc2(gate.fc1(pooled)))
    torch.testing.assert_close(gate(x), expected)
    assert not torch.allclose(expected, torch.sigmoid(gate.fc2(torch.relu(gate.fc1(pooled)))))  # a ReLU would differ
    gate.train()  # adapting: dropout 0.2 on the hidden layer
    torch.manual_seed(1)
    out = gate(x)
    torch.manual_seed(1)
    hidden = torch.nn.functional.dropout(gate.fc1(pooled), 0.2, True)
    torch.testing.assert_close(out, torch.sigmoid(gate.fc2(hidden)))
    assert not torch.allclose(out, expected)
