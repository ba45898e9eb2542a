"""The bundle's intensity setting: each mode against a hand-computed volume, bad input named, and the
bundle's train and inference configs scaling as the setting says."""

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser

from conftest import BUNDLE, TINY_OVERRIDES
from fedharmony.bundle.intensity import VolumeIntensity, VolumeIntensityd


def _ramp():
    # 100 distinct values 0, 10, ..., 990 plus a constant offset, in a (1, 5, 5, 4) volume
    return torch.arange(100, dtype=torch.float32).reshape(1, 5, 5, 4) * 10 + 40


def test_released_clips_at_the_99th_percentile_scales_to_255_and_truncates():
    x = _ramp()
    values = x.flatten().numpy().astype(np.float64)
    lo, p99 = values.min(), np.percentile(values, 99)  # 40 and 40 + 980.1
    expected = np.floor(np.clip((values - lo) / (p99 - lo), 0, 1) * 255)
    out = VolumeIntensity("released")(x)
    np.testing.assert_allclose(out.flatten().numpy(), expected, atol=1e-4)
    assert out.min() == 0 and out.max() == 255 and torch.equal(out, torch.floor(out))
    assert (out == 255).sum() == 1  # only the top value lies above the 99th percentile


def test_zscore_gives_zero_mean_unit_variance_and_raw_keeps_values():
    x = _ramp()
    z = VolumeIntensity("zscore")(x)
    assert abs(float(z.mean())) < 1e-5 and abs(float(z.std(unbiased=False)) - 1) < 1e-4
    torch.testing.assert_close(VolumeIntensity("raw")(x), x)
    # integer storage becomes float for every mode
    assert VolumeIntensity("raw")(x.to(torch.int16)).dtype == torch.float32


def test_gain_and_offset_vanish_under_zscore_and_released_but_not_raw():
    x = _ramp()
    scanner_b = 2.5 * x + 300
    for mode in ("zscore", "released"):
        torch.testing.assert_close(VolumeIntensity(mode)(scanner_b), VolumeIntensity(mode)(x), atol=1e-3, rtol=0)
    assert not torch.allclose(VolumeIntensity("raw")(scanner_b), VolumeIntensity("raw")(x))


def test_an_unknown_mode_and_a_volume_with_nan_are_named():
    with pytest.raises(ValueError, match=r"intensity must be one of \['zscore', 'released', 'raw'\], got 'minmax'"):
        VolumeIntensity("minmax")
    x = _ramp()
    x[0, 1, 1, 1] = float("nan")
    with pytest.raises(ValueError, match=r"VolumeIntensityd\('image', mode='released'\).*NaN or Inf"):
        VolumeIntensityd("image", mode="released")({"image": x})


def _parser(config, **overrides):
    parser = ConfigParser()
    parser.read_config([str(BUNDLE / "configs" / c) for c in config])
    parser["bundle_root"] = str(BUNDLE)
    for k, v in overrides.items():
        parser[k] = v
    return parser


@pytest.mark.parametrize("mode", ["zscore", "released", "raw"])
def test_the_bundle_scales_training_and_inference_inputs_as_the_setting_says(tiny_sites, mode):
    train = _parser(["train.json"], dataset_dir=str(tiny_sites / "HK"), intensity=mode, **TINY_OVERRIDES)
    item = train.get_parsed_content("validate#dataset")[0]
    image = item["image"]
    if mode == "released":
        assert image.min() == 0 and image.max() == 255 and torch.equal(image, torch.floor(image))
    elif mode == "zscore":
        assert abs(float(image.mean())) < 1e-4
    else:  # as stored
        import nibabel as nib

        stored = nib.load(item["image"].meta["filename_or_obj"]).get_fdata()
        assert float(image.max()) == pytest.approx(float(stored.max()), rel=1e-5)
    # inference preprocessing is the same path: the same volume gives the same network input
    infer = _parser(["inference.json"], dataset_dir=str(tiny_sites / "HK"), intensity=mode)
    prep = infer.get_parsed_content("preprocessing")
    same = prep({"image": item["image"].meta["filename_or_obj"]})
    torch.testing.assert_close(same["image"].as_tensor(), image.as_tensor())


def test_an_unknown_intensity_in_the_bundle_is_named(tiny_sites):
    train = _parser(["train.json"], dataset_dir=str(tiny_sites / "HK"), intensity="minmax")
    with pytest.raises(RuntimeError, match="VolumeIntensityd") as failure:  # MONAI names the component
        train.get_parsed_content("validate#preprocessing")
    assert "intensity must be one of ['zscore', 'released', 'raw'], got 'minmax'" in str(failure.value.__cause__)
