"""HarmoFL's first layer: the amplitude target lives in a buffer and follows the card's rules."""

import pytest
import torch

from fedharmony.methods.harmofl.harmonize import batch_amplitude
from fedharmony.methods.harmofl.networks import AmplitudeNormalization, HarmonizedNetwork, use_global_targets


def _batches(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(2, 3, 16, 16, generator=g) * (i + 1) for i in range(n)]


def test_paper_mode_is_a_moving_average_of_training_batches():
    layer = AmplitudeNormalization(3, (16, 16), ratio=0.1, momentum=0.1).train()
    b1, b2, _ = _batches()
    layer(b1)
    torch.testing.assert_close(layer.target, batch_amplitude(b1))
    layer(b2)
    torch.testing.assert_close(layer.target, 0.9 * batch_amplitude(b1) + 0.1 * batch_amplitude(b2))


def test_released_mode_freezes_at_the_first_batch_and_shifts_means_only():
    layer = AmplitudeNormalization(3, (16, 16), ratio=0.3, mode="released").train()
    b1, b2, _ = _batches()
    layer(b1)
    layer(b2)
    torch.testing.assert_close(layer.target, batch_amplitude(b1))
    assert layer.ratio == 0.0


def test_evaluation_never_changes_the_target_and_global_target_is_kept():
    layer = AmplitudeNormalization(3, (16, 16)).train()
    b1, b2, b3 = _batches()
    layer(b1)
    saved = layer.target.clone()
    layer.eval()(b2)
    torch.testing.assert_close(layer.target, saved)
    layer.train()
    use_global_targets(layer)  # the site received the server's averaged target
    layer(b3)
    torch.testing.assert_close(layer.target, saved)


def test_target_travels_in_the_state_dict():
    net = HarmonizedNetwork(torch.nn.Conv2d(3, 2, 1), 3, (16, 16)).train()
    net(_batches(1)[0])
    sd = net.state_dict()
    assert "harmonize.target" in sd and sd["harmonize.target"].abs().sum() > 0
    fresh = HarmonizedNetwork(torch.nn.Conv2d(3, 2, 1), 3, (16, 16))
    fresh.load_state_dict(sd)
    x = _batches(1, seed=5)[0]
    torch.testing.assert_close(fresh.eval()(x), net.eval()(x))


def test_bad_shapes_and_settings_are_refused():
    layer = AmplitudeNormalization(3, (16, 16)).train()
    with pytest.raises(ValueError, match=r"expects inputs \(B, 3, 16, 16\)"):
        layer(torch.rand(2, 3, 16, 8))
    with pytest.raises(RuntimeError, match="no target yet"):
        AmplitudeNormalization(3, (16, 16)).eval()(torch.rand(1, 3, 16, 16))
    with pytest.raises(ValueError, match="ratio"):
        AmplitudeNormalization(3, (16, 16), ratio=0.7)
    with pytest.raises(ValueError, match="mode"):
        AmplitudeNormalization(3, (16, 16), mode="fda")


def test_prime_targets_uses_the_training_batch_only_where_missing():
    from fedharmony.methods.harmofl.networks import layers_without_target, prime_targets

    net = HarmonizedNetwork(torch.nn.Conv2d(3, 2, 1), 3, (16, 16))
    train_batch = _batches(1)[0]
    assert prime_targets(net, train_batch) == 1 and not layers_without_target(net)
    torch.testing.assert_close(net.harmonize.target, batch_amplitude(train_batch))
    assert prime_targets(net, _batches(1, seed=3)[0]) == 0  # an existing target is never replaced


def test_monai_transform_matches_the_layer(tmp_path):
    from fedharmony.methods.harmofl.transforms import AmplitudeNormalized

    net = HarmonizedNetwork(torch.nn.Identity(), 3, (16, 16), ratio=0.2).train()
    net(_batches(1)[0])
    torch.save(net.state_dict(), tmp_path / "model.pt")
    x = _batches(1, seed=9)[0][0]
    by_layer = net.eval()(x[None])[0]
    for target in (net.harmonize.target, tmp_path / "model.pt"):
        out = AmplitudeNormalized("image", target, ratio=0.2)({"image": x})["image"]
        torch.testing.assert_close(out, by_layer)
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        AmplitudeNormalized("image", net.harmonize.target)({"image": x[None]})
