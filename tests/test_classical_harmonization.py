"""N4 bias-field correction and federated histogram standardization on phantom volumes with a known
bias field / a known intensity curve: the corrected volume is closer to the clean one, the federated
scale equals the pooled one, and bad input is named."""

import dataclasses

import numpy as np
import pytest
import torch

from fedharmony.bundle.classical_harmonization import (
    HistogramStandardize, HistogramStandardized, N4BiasCorrection, N4BiasCorrectiond, format_scale, parse_scale,
    site_landmarks, standard_scale, volume_landmarks)
from fedharmony.phantom import load_profiles
from fedharmony.phantom.prostate import apply_scanner, make_anatomy


def _scanned(profile_name, anatomy_seed, **changes):
    """One phantom anatomy imaged by a site's scanner (``changes`` edit the profile), and its tissue region."""
    profile = dataclasses.replace(load_profiles()[profile_name], blur_mm=0.0, ringing=1.0, **changes)
    signal, _ = make_anatomy(np.random.default_rng(anatomy_seed), 96, 12)
    image = apply_scanner(signal, profile, 1.0, np.random.default_rng(1))
    return image[None], (signal > np.percentile(signal, 60))[None]


def _log_ratio_spread(volume, reference, tissue):
    # a multiplicative field left in the volume shows as spread of log(volume / reference) over the tissue
    return float(np.std(np.log(np.clip(volume[tissue], 1e-6, None) / np.clip(reference[tissue], 1e-6, None))))


def test_n4_removes_much_of_a_known_bias_field():
    # the same anatomy and noise draw, imaged with a strong coil field (peak off-centre) and with a flat coil
    biased, tissue = _scanned("BIDMC", 5, bias=0.6, bias_center=(0.6, -0.4))
    unbiased, _ = _scanned("BIDMC", 5, bias=0.0)
    corrected = N4BiasCorrection()(torch.as_tensor(biased)).numpy()
    before, after = _log_ratio_spread(biased, unbiased, tissue), _log_ratio_spread(corrected, unbiased, tissue)
    assert after < 0.8 * before, (before, after)
    assert corrected.shape == biased.shape and corrected.dtype == np.float32


def test_n4_disabled_and_on_a_volume_without_foreground():
    x = torch.as_tensor(_scanned("HK", 1)[0])
    assert N4BiasCorrection(enabled=False)(x) is x
    with pytest.raises(ValueError, match=r"N4BiasCorrectiond\('image'\) on an in-memory volume: .*no foreground"):
        N4BiasCorrectiond("image")({"image": torch.zeros(1, 32, 32, 4)})
    with pytest.raises(ValueError, match="NaN or Inf"):
        N4BiasCorrection()(torch.full((1, 16, 16, 2), float("nan")))


def _zscore(x, region):
    return (x - x[region].mean()) / x[region].std()


def test_histogram_standardization_undoes_a_known_intensity_curve():
    # scanner A responds with gamma 0.55, scanner B with gamma 1.35, different gains and offsets; only the
    # sites' landmark summaries meet to make the scale
    curve_a, curve_b = {"gamma": 0.55, "scale": 3000.0, "offset": 0.0}, {"gamma": 1.35, "scale": 700.0, "offset": 50.0}
    site_a = [_scanned("UCL", s, bias=0.0, **curve_a)[0] for s in range(3)]
    site_b = [_scanned("UCL", s, bias=0.0, **curve_b)[0] for s in range(3, 6)]
    scale = standard_scale([site_landmarks(site_a), site_landmarks(site_b)])
    standardize = HistogramStandardize(format_scale(scale))
    (a, tissue), (b, _) = _scanned("UCL", 9, bias=0.0, **curve_a), _scanned("UCL", 9, bias=0.0, **curve_b)
    sa, sb = standardize(torch.as_tensor(a)).numpy(), standardize(torch.as_tensor(b)).numpy()
    # in the tissue, the two scanners' volumes agree much better standardized than z-scored (which only
    # removes gain and offset, not the curve)
    zscore_gap = np.abs(_zscore(a, tissue) - _zscore(b, tissue))[tissue].mean()
    standardized_gap = np.abs(_zscore(sa, tissue) - _zscore(sb, tissue))[tissue].mean()
    raw_gap = (np.abs(a - b)[tissue] / a[tissue].std()).mean()
    assert standardized_gap < 0.8 * zscore_gap and standardized_gap < 0.05 * raw_gap, (zscore_gap, standardized_gap)
    # a volume's own landmarks land on the scale
    np.testing.assert_allclose(volume_landmarks(sa), scale, rtol=0, atol=1e-3 * (scale[-1] - scale[0]))


def test_the_federated_scale_is_the_pooled_one():
    volumes = [_scanned("HK", s)[0] * (1 + s) for s in range(5)]
    pooled = standard_scale([site_landmarks(volumes)])
    federated = standard_scale([site_landmarks(volumes[:2]), site_landmarks(volumes[2:])])
    np.testing.assert_allclose(federated, pooled, rtol=1e-12)
    summary = site_landmarks(volumes[:2])
    assert set(summary) == {"percentiles", "landmarks", "count"} and len(summary["landmarks"]) == 11  # all that travels


def test_bad_landmark_input_is_named():
    with pytest.raises(ValueError, match=r"volume 1: volume \(1, 8, 8, 2\) has \d+ foreground voxels .* fewer than"):
        site_landmarks([_scanned("HK", 0)[0], np.random.rand(1, 8, 8, 2)])
    with pytest.raises(ValueError, match="different landmark percentiles"):
        standard_scale([{"percentiles": [1, 99], "landmarks": [0, 100], "count": 1},
                        {"percentiles": [2, 98], "landmarks": [0, 100], "count": 1}])
    with pytest.raises(ValueError, match="histogram_scale must be 11 comma-separated numbers, got 'a,b'"):
        parse_scale("a,b")
    with pytest.raises(ValueError, match="histogram_scale must be 11 increasing numbers"):
        parse_scale(",".join(["1"] * 11))
    assert parse_scale("") is None
    x = torch.as_tensor(_scanned("HK", 0)[0])
    assert HistogramStandardized("image", scale="")({"image": x})["image"] is x  # off


def _bundle_item(dataset_dir, **overrides):
    from monai.bundle import ConfigParser

    from conftest import BUNDLE, TINY_OVERRIDES

    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "train.json"))
    parser["bundle_root"], parser["dataset_dir"] = str(BUNDLE), str(dataset_dir)
    for k, v in {**TINY_OVERRIDES, "intensity": "raw", **overrides}.items():
        parser[k] = v
    return parser.get_parsed_content("validate#dataset")[0]


def test_the_landmark_tool_and_the_bundle_standardize_with_the_agreed_scale(tiny_sites, tmp_path, capsys):
    import json

    import histogram_landmarks  # tools/ (on sys.path through conftest); main() as the command line runs it

    files = []
    for site in ("BIDMC", "HK"):  # each site computes its summary on its own data
        out = tmp_path / f"{site}.json"
        assert histogram_landmarks.main(["site", "--dataset-dir", str(tiny_sites / site), "--out", str(out)]) == 0
        assert set(json.loads(out.read_text())) == {"percentiles", "landmarks", "count", "bias_correction"}
        files.append(str(out))
    capsys.readouterr()
    assert histogram_landmarks.main(["site", "--dataset-dir", str(tiny_sites / "HK"), "--out", files[1]]) == 2
    assert "exists: pass --overwrite" in capsys.readouterr().err  # nothing replaced silently
    assert histogram_landmarks.main(["combine", *files]) == 0
    scale_text = capsys.readouterr().out.strip()
    scale = parse_scale(scale_text)
    # the bundle maps the validation volume's landmarks onto the scale (raw intensity, stored grid kept)
    item = _bundle_item(tiny_sites / "HK", histogram_scale=scale_text)
    np.testing.assert_allclose(volume_landmarks(item["image"], min_voxels=1), scale, atol=0.02 * (scale[-1] - scale[0]))
    plain = _bundle_item(tiny_sites / "HK")
    assert not np.allclose(volume_landmarks(plain["image"], min_voxels=1), scale, atol=0.02 * (scale[-1] - scale[0]))
    assert histogram_landmarks.main(["combine", files[0], str(tmp_path / "missing.json")]) == 2
    assert "missing.json: not a landmark summary" in capsys.readouterr().err


def test_the_bundle_applies_n4_when_asked(tiny_sites):
    corrected = _bundle_item(tiny_sites / "HK", bias_correction=True)["image"]
    plain = _bundle_item(tiny_sites / "HK")["image"]
    expected = N4BiasCorrection()(plain.clone())  # raw intensity, stored grid: N4 commutes with the rest
    torch.testing.assert_close(corrected.as_tensor(), expected.as_tensor(), atol=1e-3, rtol=1e-4)
    assert not torch.allclose(corrected.as_tensor(), plain.as_tensor())
