"""IOP-FL inside personalization: the update rule, on its own and inside a site's rounds."""

import pytest
import torch

from conftest import BUNDLE, TINY_OVERRIDES
from fedharmony.bundle.site import BundleSite
from fedharmony.methods.iopfl.personalization import ema_update


def test_update_rule_and_bad_input():
    theta1 = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(3)}
    theta2 = {"w": torch.tensor([3.0, 6.0]), "n": torch.tensor(5)}
    phi1 = ema_update(None, theta1, 0.25)
    assert torch.equal(phi1["w"], theta1["w"]) and phi1["w"] is not theta1["w"]
    phi2 = ema_update(phi1, theta2, 0.25)
    torch.testing.assert_close(phi2["w"], torch.tensor([2.5, 5.0]))
    assert phi2["n"].item() == 5  # integer buffers are not averaged
    with pytest.raises(ValueError, match="in \\[0, 1\\)"):
        ema_update(phi1, theta2, 1.0)
    with pytest.raises(ValueError, match="differ in keys"):
        ema_update(phi1, {"w": theta2["w"]}, 0.1)
    with pytest.raises(ValueError, match="shape"):
        ema_update(phi1, {"w": torch.zeros(3), "n": theta2["n"]}, 0.1)


def test_site_personalized_model_follows_the_formula_over_three_rounds_and_survives_restart(tiny_sites, tmp_path):
    a = 0.3
    kwargs = dict(bundle_root=str(BUNDLE), dataset_dir=str(tiny_sites / "BIDMC"), state_dir=str(tmp_path / "s"),
                  site_name="BIDMC", overrides=TINY_OVERRIDES, method="iopfl",
                  method_settings={"iop_alpha": a})
    site = BundleSite(**kwargs)
    global_weights = site.shared_weights()
    thetas = []
    for _ in range(3):
        site.train(global_weights, local_epochs=1)
        thetas.append(site.state_dict())  # theta_k: this round's locally trained model
        global_weights = {k: 0.5 * v if v.is_floating_point() else v for k, v in thetas[-1].items()}  # a new "global"
    expected = thetas[0]
    for theta in thetas[1:]:
        expected = {k: a * expected[k] + (1 - a) * v if v.is_floating_point() else v for k, v in theta.items()}
    assert any(".adn.N." in k and k.endswith("running_mean") for k in expected)  # norm statistics included
    for k, v in expected.items():
        torch.testing.assert_close(site.method.personalized_model[k], v, msg=k)
    assert not torch.equal(site.method.personalized_model[next(iter(expected))], thetas[-1][next(iter(expected))])

    restarted = BundleSite(**kwargs)  # a new process on the same site disk
    assert restarted.round == 3
    for k, v in site.method.personalized_model.items():
        assert torch.equal(restarted.method.personalized_model[k], v), k
