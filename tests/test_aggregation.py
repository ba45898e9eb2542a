import numpy as np
import pytest

from fedharmony.aggregation import UpdateRejected, WeightedAverage, check_update, expected_shapes, is_local_key
from fedharmony.fl.job import NORM_LAYER_KEYS

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
