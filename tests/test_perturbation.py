"""HarmoFL weight perturbation (non-adaptive SAM) against a hand-computed step."""

import pytest
import torch
from torch import nn

from fedharmony.methods.harmofl.perturbation import WeightPerturbedIteration, frozen_norm_statistics, perturbed_step


def _setup(seed=0):
    torch.manual_seed(seed)
    net = nn.Linear(3, 1)
    x, y = torch.randn(8, 3), torch.randn(8, 1)
    return net, x, y


def _grads(params, loss_fn):
    """Gradient of loss_fn at the given parameter values (hand-computed reference, no optimizer)."""
    ps = [p.detach().clone().requires_grad_(True) for p in params]
    loss = loss_fn(*ps)
    return [g.detach() for g in torch.autograd.grad(loss, ps)]


def test_perturbed_step_equals_hand_computed_sam_with_sgd():
    net, x, y = _setup()
    alpha, lr = 0.05, 0.1
    w0, b0 = net.weight.detach().clone(), net.bias.detach().clone()

    def loss_at(w, b):
        return ((x @ w.T + b - y) ** 2).mean()

    g = _grads([w0, b0], loss_at)
    norm = torch.sqrt(sum((gi ** 2).sum() for gi in g))  # one global L2 norm over all parameters
    dw, db = alpha * g[0] / (norm + 1e-12), alpha * g[1] / (norm + 1e-12)
    g2 = _grads([w0 + dw, b0 + db], loss_at)
    expected_w, expected_b = w0 - lr * g2[0], b0 - lr * g2[1]

    opt = torch.optim.SGD(net.parameters(), lr=lr)
    loss = perturbed_step(net.parameters(), lambda: ((net(x) - y) ** 2).mean(), opt, alpha)
    torch.testing.assert_close(net.weight.detach(), expected_w)
    torch.testing.assert_close(net.bias.detach(), expected_b)
    torch.testing.assert_close(loss, loss_at(w0, b0))  # the logged loss is the one at w


def test_alpha_zero_is_a_plain_step_and_bad_alpha_is_refused():
    net, x, y = _setup(1)
    ref, _, _ = _setup(1)
    opt, ref_opt = torch.optim.Adam(net.parameters(), 1e-2), torch.optim.Adam(ref.parameters(), 1e-2)
    perturbed_step(net.parameters(), lambda: ((net(x) - y) ** 2).mean(), opt, 0.0)
    ref_opt.zero_grad()
    ((ref(x) - y) ** 2).mean().backward()
    ref_opt.step()
    for p, q in zip(net.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q)
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="alpha"):
            perturbed_step(net.parameters(), lambda: ((net(x) - y) ** 2).mean(), opt, bad)


def test_second_pass_does_not_touch_batchnorm_running_statistics():
    bn = nn.BatchNorm1d(3)
    with frozen_norm_statistics(bn):
        bn(torch.randn(16, 3) + 5)
    assert torch.equal(bn.running_mean, torch.zeros(3)) and bn.momentum == 0.1


def test_monai_trainer_uses_the_iteration_function():
    from monai.engines import SupervisedTrainer

    net, x, y = _setup(2)
    data = [{"image": x, "label": y}] * 3
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    trainer = SupervisedTrainer(device=torch.device("cpu"), max_epochs=1, train_data_loader=data, network=net,
                                optimizer=opt, loss_function=nn.MSELoss(),
                                iteration_update=WeightPerturbedIteration(alpha=0.05))
    before = net.weight.detach().clone()
    trainer.run()
    assert trainer.state.iteration == 3 and not torch.equal(before, net.weight)
    assert len(opt.state) == 2 and all(s["step"] == 3 for s in opt.state.values())  # base optimizer stepped once per batch


def test_second_pass_does_not_count_the_batch_twice_in_the_amplitude_target():
    from fedharmony.methods.harmofl.harmonize import batch_amplitude
    from fedharmony.methods.harmofl.networks import HarmonizedNetwork

    torch.manual_seed(3)
    net = HarmonizedNetwork(nn.Conv2d(3, 1, 1), 3, (8, 8), ratio=0.1, momentum=0.5).train()
    first, second = torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8) * 2
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for batch in (first, second):
        perturbed_step(net.parameters(), lambda: net(batch).mean(), opt, 0.05,
                       second_pass=lambda: frozen_norm_statistics(net))
    expected = 0.5 * batch_amplitude(first) + 0.5 * batch_amplitude(second)  # one update per batch
    torch.testing.assert_close(net.harmonize.target, expected)
    assert net.harmonize.frozen is False
