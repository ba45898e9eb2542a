"""The bundles' optimizer settings and the learning rate by round (fedharmony.bundle.optim), which the
released PRR-FL protocol uses: SGD without momentum, lr 1e-2 halved every 5 rounds, optimizers built anew."""

import pytest
import torch

from conftest import BUNDLE, TINY_OVERRIDES
from fedharmony.bundle.optim import RoundSchedule, build_optimizer, round_learning_rate


def test_round_learning_rate_is_a_step_decay_by_round():
    # the released PRR-FL schedule, by hand: 1e-2 for rounds 0-4, 5e-3 for 5-9, 2.5e-3 for 10-14
    assert [round_learning_rate(1e-2, 0.5, 5, t) for t in (0, 4, 5, 9, 10, 14)] == [1e-2, 1e-2, 5e-3, 5e-3,
                                                                                      2.5e-3, 2.5e-3]
    assert round_learning_rate(2e-3, 1.0, 5, 49) == 2e-3  # gamma 1: constant


def test_build_optimizer_gives_plain_sgd_or_the_bundles_adam_and_names_bad_settings():
    params = [torch.nn.Parameter(torch.zeros(3))]
    sgd = build_optimizer("sgd", params, lr=0.01, weight_decay=1e-6)
    assert type(sgd) is torch.optim.SGD and sgd.defaults["momentum"] == 0 and sgd.defaults["weight_decay"] == 1e-6
    adam = build_optimizer("adam", params, lr=0.002, weight_decay=1e-4)
    assert type(adam) is torch.optim.Adam and adam.defaults == torch.optim.Adam(params, lr=0.002,
                                                                                  weight_decay=1e-4).defaults
    with pytest.raises(ValueError, match=r"unknown optimizer_name 'rmsprop'; choose one of \('adam', 'sgd'\)"):
        build_optimizer("rmsprop", params, lr=0.01)
    with pytest.raises(ValueError, match="learning_rate must be a finite number > 0, got nan"):
        build_optimizer("sgd", params, lr=float("nan"))
    for bad, match in (({"gamma": 0}, "lr_round_gamma must be in"), ({"gamma": 1.5}, "lr_round_gamma must be in"),
                       ({"step": 0}, "lr_round_step must be an integer >= 1"),
                       ({"reset_each_round": "yes"}, "optimizer_reset_each_round must be true or false")):
        with pytest.raises(ValueError, match=match):
            RoundSchedule(0.01, **bad)


def _site(tiny_sites, tmp_path, method="fedavg", **overrides):
    from fedharmony.bundle.site import BundleSite

    return BundleSite(str(BUNDLE), str(tiny_sites / "BIDMC"), str(tmp_path / "state"), "BIDMC", method=method,
                      overrides={**TINY_OVERRIDES, **overrides},
                      config_file=["configs/train.json", "configs/prrfl.json"] if method == "prrfl" else "configs/train.json")


def test_a_site_sets_each_rounds_rate_on_every_optimizer_and_a_restarted_site_keeps_the_schedule(tiny_sites, tmp_path):
    released = {"optimizer_name": "sgd", "learning_rate": 0.01, "lr_round_gamma": 0.5, "lr_round_step": 1,
                "optimizer_reset_each_round": True}
    site = _site(tiny_sites, tmp_path, "prrfl", **released)
    deputy_opt = site.method.transfer.deputy_optimizer
    assert type(site.optimizer) is torch.optim.SGD and type(deputy_opt) is torch.optim.SGD
    site.train(None, local_epochs=1)  # round 0 at 0.01
    site.train(None, local_epochs=1)  # round 1 at 0.005, on the personalized model and the deputy
    assert [g["lr"] for g in site.optimizer.param_groups] == [0.005]
    assert [g["lr"] for g in deputy_opt.param_groups] == [0.005]
    # a restarted site reads its round from its saved state and starts from the bundle's rate, not the saved one
    restarted = _site(tiny_sites, tmp_path, "prrfl", **released)
    assert restarted.round == 2
    restarted.train(None, local_epochs=1)
    assert [g["lr"] for g in restarted.optimizer.param_groups] == [0.0025]


def test_reset_each_round_drops_the_optimizer_state_and_the_default_schedule_changes_nothing(tiny_sites, tmp_path):
    site = _site(tiny_sites, tmp_path / "reset", optimizer_reset_each_round=True)
    site.train(None, local_epochs=1)
    assert site.optimizer.state  # Adam's moments after a round
    assert site.round_schedule.apply(site.method.optimizers(), site.round) == 0.002 and not site.optimizer.state

    default = _site(tiny_sites, tmp_path / "default")
    assert type(default.optimizer) is torch.optim.Adam and not default.round_schedule.active
    default.train(None, local_epochs=1)
    state = {k: v["exp_avg"].clone() for k, v in default.optimizer.state.items()}
    default.round_schedule.apply(default.method.optimizers(), default.round)
    assert [g["lr"] for g in default.optimizer.param_groups] == [0.002]
    assert all(torch.equal(default.optimizer.state[k]["exp_avg"], v) for k, v in state.items())  # state kept


def test_a_bad_schedule_setting_is_named_with_the_site(tiny_sites, tmp_path):
    with pytest.raises(ValueError, match="site 'BIDMC': lr_round_step must be an integer >= 1, got 0"):
        _site(tiny_sites, tmp_path, lr_round_step=0)
