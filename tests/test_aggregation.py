import numpy as np
import pytest

from fedharmony.core.aggregation import UpdateRejected, WeightedAverage, check_update, expected_shapes, is_local_key
from fedharmony.core.norm_layers import NORM_LAYER_KEYS

REF = {"conv.weight": np.zeros((2, 3)), "bn.running_mean": np.zeros(2), "bn.num_batches_tracked": np.array(0)}


def test_weighted_mean_by_samples():
    avg = WeightedAverage()
    avg.add("a", {"w": np.array([1.0, 1.0])}, weight=1)
    avg.add("b", {"w": np.array([4.0, 7.0])}, weight=3)
    np.testing.assert_allclose(avg.result()["w"], [(1 + 12) / 4, (1 + 21) / 4])
    assert avg.contributors == {"a": 1, "b": 3}


def test_integer_buffers_keep_dtype():
    avg = WeightedAverage()
    avg.add("a", {"n": np.array(10, dtype=np.int64)}, 1)
    avg.add("b", {"n": np.array(13, dtype=np.int64)}, 1)
    out = avg.result()["n"]
    assert out.dtype == np.int64 and out == 12  # rint(11.5) = 12


def test_local_keys_are_not_expected_and_dropped():
    expected = expected_shapes(REF, local_keys=r"(^|\.)bn\.")
    assert set(expected) == {"conv.weight"}
    upd = {"conv.weight": np.ones((2, 3)), "bn.running_mean": np.ones(2)}
    assert set(check_update(upd, expected, r"(^|\.)bn\.")) == {"conv.weight"}


@pytest.mark.parametrize("update,reason", [
    ({"conv.weight": np.full((2, 3), np.nan)}, "NaN"),
    ({"conv.weight": np.array([[1.0, np.inf, 0], [0, 0, 0]])}, "NaN or Inf"),
    ({"conv.weight": np.ones((3, 2))}, "shape"),
    ({}, "missing"),
    ({"conv.weight": np.ones((2, 3)), "head.weight": np.ones(1)}, "unexpected"),
])
def test_bad_updates_are_rejected_with_reason(update, reason):
    with pytest.raises(UpdateRejected, match=reason):
        check_update(update, expected_shapes(REF, r"(^|\.)bn\."), r"(^|\.)bn\.")


def test_a_site_cannot_contribute_twice_or_with_bad_weight():
    avg = WeightedAverage()
    avg.add("a", {"w": np.ones(1)}, 1)
    with pytest.raises(UpdateRejected):
        avg.add("a", {"w": np.ones(1)}, 1)
    with pytest.raises(UpdateRejected):
        avg.add("b", {"w": np.ones(1)}, 0)


def test_norm_key_pattern_matches_monai_unet_norms_only():
    from monai.networks.nets import UNet

    net = UNet(2, 3, 2, channels=(4, 8, 16), strides=(2, 2), num_res_units=1, norm="batch")
    keys = list(net.state_dict())
    local = [k for k in keys if is_local_key(k, NORM_LAYER_KEYS)]
    norm_modules = [n for n, m in net.named_modules() if isinstance(m, __import__("torch").nn.BatchNorm2d)]
    assert local and all(any(k.startswith(n + ".") for n in norm_modules) for k in local)
    assert len(local) == 5 * len(norm_modules)  # weight, bias, running_mean, running_var, num_batches_tracked


def test_nvflare_aggregator_weights_by_cases_and_rejects_bad_sites():
    """The NVFlare ModelAggregator on real FLModel updates (the server's persistor is not needed
    for this: the expected shapes are given directly)."""
    from nvflare.app_common.abstract.fl_model import FLModel, ParamsType

    from fedharmony.fl.aggregator import SiteUpdateAggregator

    agg = SiteUpdateAggregator(local_keys=r"(^|\.)bn\.")
    agg._expected = expected_shapes(REF, agg.local_keys)

    def update(site, value, cases, **extra):
        params = {"conv.weight": np.full((2, 3), value), "bn.running_mean": np.full(2, value), **extra}
        return FLModel(params=params, params_type=ParamsType.FULL, metrics={"val_mean_dice": value / 10},
                       meta={"client_name": site, "num_samples": cases})

    agg.accept_model(update("site-1", 1.0, cases=1))
    agg.accept_model(update("site-2", 4.0, cases=3))
    agg.accept_model(update("site-3", np.nan, cases=100))  # NaN: rejected
    agg.accept_model(update("site-4", 9.0, cases=100, **{"head.weight": np.ones(1)}))  # unexpected key
    out = agg.aggregate_model()
    np.testing.assert_allclose(out.params["conv.weight"], (1 * 1 + 3 * 4) / 4)
    assert "bn.running_mean" not in out.params  # local keys never averaged
    assert set(out.meta["rejected"]) == {"site-3", "site-4"} and out.meta["nr_aggregated"] == 2
    assert out.metrics["val_mean_dice"] == pytest.approx((0.1 + 3 * 0.4) / 4)

    agg.reset_stats()
    agg.accept_model(update("site-3", np.inf, cases=1))
    with pytest.raises(RuntimeError, match="no site update could be aggregated"):
        agg.aggregate_model()


def test_the_released_harmofl_uniform_mean_ignores_the_case_counts():
    """weigh_by_samples=False (HarmoFL's released protocol): 1/K for each site, whatever its training-set size,
    for weights and buffers alike (the amplitude target is a buffer)."""
    from nvflare.app_common.abstract.fl_model import FLModel, ParamsType

    from fedharmony.fl.aggregator import SiteUpdateAggregator

    ref = {"conv.weight": np.zeros((2, 3)), "harmonize.target": np.zeros(4)}
    agg = SiteUpdateAggregator(weigh_by_samples=False)
    agg._expected = expected_shapes(ref, "")
    for site, value, cases in (("site-1", 1.0, 1), ("site-2", 4.0, 3), ("site-3", 10.0, 6)):
        agg.accept_model(FLModel(params={"conv.weight": np.full((2, 3), value), "harmonize.target": np.full(4, value)},
                                 params_type=ParamsType.FULL, meta={"client_name": site, "num_samples": cases}))
    out = agg.aggregate_model()
    np.testing.assert_allclose(out.params["conv.weight"], (1 + 4 + 10) / 3)  # case-weighted: (1 + 12 + 60) / 10
    np.testing.assert_allclose(out.params["harmonize.target"], 5.0)


def test_nvflare_aggregator_keeps_the_kind_of_update_and_refuses_a_mixed_round():
    """Sites that send differences (for NVFlare's privacy filters) get a mean difference back,
    which NVFlare's FedAvg adds to the global model; a round does not mix the two kinds."""
    from nvflare.app_common.abstract.fl_model import FLModel, ParamsType

    from fedharmony.fl.aggregator import SiteUpdateAggregator

    agg = SiteUpdateAggregator(local_keys=r"(^|\.)bn\.")
    agg._expected = expected_shapes(REF, agg.local_keys)

    def update(site, value, kind):
        return FLModel(params={"conv.weight": np.full((2, 3), value)}, params_type=kind,
                       meta={"client_name": site, "num_samples": 1})

    agg.accept_model(update("site-1", 0.1, ParamsType.DIFF))
    agg.accept_model(update("site-2", 0.3, ParamsType.DIFF))
    agg.accept_model(update("site-3", 5.0, ParamsType.FULL))
    out = agg.aggregate_model()
    assert out.params_type == ParamsType.DIFF
    np.testing.assert_allclose(out.params["conv.weight"], 0.2)
    assert "site-3" in out.meta["rejected"] and "while this round's other updates are" in out.meta["rejected"]["site-3"]

    agg.reset_stats()  # a new round may use the other kind
    agg.accept_model(update("site-3", 5.0, ParamsType.FULL))
    assert agg.aggregate_model().params_type == ParamsType.FULL


def test_weight_diff_is_the_update_against_the_received_global_model():
    from fedharmony.fl.executor import weight_diff

    site = {"w": np.array([1.5, 2.0], dtype=np.float32), "n": np.array(7, dtype=np.int64)}
    base = {"w": np.array([1.0, 2.5], dtype=np.float32), "n": np.array(5, dtype=np.int64)}
    diff = weight_diff(site, base)
    np.testing.assert_allclose(diff["w"], [0.5, -0.5])
    assert diff["w"].dtype == np.float32 and diff["n"] == 2 and diff["n"].dtype == np.int64
    with pytest.raises(ValueError, match="lacks"):
        weight_diff({**site, "extra": np.ones(1)}, base)


@pytest.mark.parametrize("bundle,overrides", [("prostate_mri_seg", {}), ("image_classification", {"task": "dermoscopy"}),
                                              ("image_classification", {"task": "histology"})])
def test_the_norm_key_regex_selects_exactly_the_norm_modules_keys_of_every_bundle_network(bundle, overrides):
    """The two views of "normalization layer" (module types, key regex) agree on the networks we ship."""
    from conftest import REPO
    from fedharmony.bundle.networks import build_network
    from fedharmony.core.norm_layers import norm_layer_keys

    net = build_network(str(REPO / "bundles" / bundle), overrides=overrides)
    by_type = norm_layer_keys(net)
    by_regex = [k for k in net.state_dict() if is_local_key(k, NORM_LAYER_KEYS)]
    assert by_type and by_regex == by_type
