"""The MR signal simulator (fedharmony.phantom.mr) against closed forms: the signal equations, TE and T2, the Ernst
angle, the inversion null, partial volume through a slice, the blur of k-space truncation, Rician noise, the
coil, and profiles refused by field."""

import math

import numpy as np
import pytest

from fedharmony.phantom.mr import (TISSUES, MRSite, Noise, ProfileError, PulseSequence, Relaxation, acquire,
                                   kspace_sample, rician, signal, slice_profile)


def _site(sequence: dict, field_t: float = 3.0, **parts) -> MRSite:
    return MRSite.from_dict({"name": "TEST", "field_t": field_t, "sequence": sequence,
                             "acquisition": {"fov_mm": [64, 64], "matrix": [64, 64], "slice_mm": 1.0}, **parts})


def test_a_single_tissue_phantom_is_the_signal_equation_times_the_receiver_scale():
    """One tissue everywhere, no noise, a volume coil, the acquisition on the simulation grid: every voxel is
    PD (1 - exp(-TR/T1)) exp(-TE/T2), by hand."""
    site = _site({"kind": "SE", "tr_ms": 2500, "te_ms": 90}, receiver_scale=1000.0)
    image, spacing = acquire({"white_matter": np.ones((4, 64, 64))}, (1.0, 1.0, 1.0), site)
    t1, t2, pd = 1084, 69, 0.77  # white matter at 3 T (Stanisz et al. 2005)
    expected = 1000 * pd * (1 - math.exp(-2500 / t1)) * math.exp(-90 / t2)
    assert image.shape == (4, 64, 64) and spacing == (1.0, 1.0, 1.0)
    assert np.allclose(image, expected, rtol=1e-5)


def test_doubling_te_scales_each_tissue_by_exp_minus_te_over_t2_and_changes_the_contrast():
    short, long = PulseSequence("SE", 3000, 40), PulseSequence("SE", 3000, 80)
    ratios = {}
    for name in ("white_matter", "grey_matter", "fluid"):
        tissue = TISSUES[name][1.5]
        ratios[name] = signal(tissue, long) / signal(tissue, short)
        assert ratios[name] == pytest.approx(math.exp(-40 / tissue.t2_ms), rel=1e-12)
    # the longer T2 keeps more signal: fluid over grey matter over white matter, so the contrast changes
    assert ratios["fluid"] > ratios["grey_matter"] > ratios["white_matter"]


def test_gradient_echo_signal_peaks_at_the_ernst_angle():
    tissue = TISSUES["grey_matter"][3.0]
    ernst = math.degrees(math.acos(math.exp(-20 / tissue.t1_ms)))
    signals = {a: signal(tissue, PulseSequence("GRE", 20, 4, flip_deg=a)) for a in np.arange(1.0, 60.0, 0.25)}
    assert max(signals, key=signals.get) == pytest.approx(ernst, abs=0.25)


def test_inversion_recovery_nulls_a_tissue_at_t1_ln2():
    fat = TISSUES["fat"][1.5]
    nulled = signal(fat, PulseSequence("IR", 15000, 10, ti_ms=fat.t1_ms * math.log(2)))
    plain = signal(fat, PulseSequence("IR", 15000, 10, ti_ms=2000))
    assert nulled < 1e-6 < plain  # STIR: fat suppression by the inversion time


def test_a_half_filled_slice_gives_the_mean():
    volume = np.zeros((8, 4, 4))
    volume[:2] = 1.0  # planes of 1 mm: the first 2 mm of the first 4 mm slice hold tissue
    out = slice_profile(volume, 1.0, 4.0)
    assert out.shape == (2, 4, 4) and np.allclose(out[0], 0.5) and np.allclose(out[1], 0.0)
    volume = np.zeros((8, 4, 4))
    volume[1] = 1.0  # a plane straddling two 1.5 mm slices (0-1.5, 1.5-3.0): half of it in each
    out = slice_profile(volume, 1.0, 1.5)
    assert out.shape == (5, 4, 4) and np.allclose(out[0], 1 / 3) and np.allclose(out[1], 1 / 3)
    gapped = slice_profile(np.ones((10, 2, 2)), 1.0, 2.0, gap_mm=1.0)  # slices at 0-2, 3-5, 6-8
    assert gapped.shape == (3, 2, 2) and np.allclose(gapped, 1.0)


def test_kspace_truncation_blurs_a_point_to_the_sinc_width_of_the_matrix():
    """Box truncation to N samples over a field of view F: the point-spread function is a sinc whose full
    width at half maximum is 1.207 F / N."""
    fine = np.zeros((256, 256))
    fine[128, 128] = 1.0  # a point on a 0.5 mm grid, 128 mm field of view
    psf = np.abs(kspace_sample(fine, (0.5, 0.5), (128, 128), (32, 32), recon_matrix=(256, 256)))
    profile = psf[:, np.argmax(psf.max(axis=0))]
    peak = profile.max()
    above = np.where(profile >= peak / 2)[0]
    # the half-maximum crossings, interpolated linearly on each side
    lo, hi = above[0], above[-1]
    left = lo - 1 + (peak / 2 - profile[lo - 1]) / (profile[lo] - profile[lo - 1])
    right = hi + (profile[hi] - peak / 2) / (profile[hi] - profile[hi + 1])
    fwhm_mm = (right - left) * 0.5
    assert fwhm_mm == pytest.approx(1.207 * 128 / 32, rel=0.05)
    # the mean is kept: a uniform slice stays uniform at its value
    assert np.allclose(kspace_sample(np.full((256, 256), 3.0), (0.5, 0.5), (128, 128), (32, 32)).real, 3.0)


def test_a_phase_error_on_every_other_line_puts_a_ghost_half_a_field_of_view_away():
    fine = np.zeros((128, 128))
    fine[40:56, 56:72] = 1.0  # a block in the upper half
    clean = np.abs(kspace_sample(fine, (1.0, 1.0), (128, 128), (64, 64)))
    ghosted = np.abs(kspace_sample(fine, (1.0, 1.0), (128, 128), (64, 64), ghost_rad=math.pi / 2))
    ghost_rows = slice(20 + 32, 28 + 32)  # the block's rows (20-28 at 2 mm) moved by half the field of view
    assert clean[ghost_rows, 28:36].max() < 0.05 < ghosted[ghost_rows, 28:36].mean()


def test_rician_noise_has_mean_sigma_sqrt_pi_over_2_where_there_is_no_signal():
    out = rician(np.zeros((400, 400)), 0.1, np.random.default_rng(0))
    assert out.mean() == pytest.approx(0.1 * math.sqrt(math.pi / 2), rel=0.01)
    strong = rician(np.full((400, 400), 10.0 + 0j), 0.1, np.random.default_rng(0))
    assert strong.mean() == pytest.approx(10.0, rel=0.001) and strong.std() == pytest.approx(0.1, rel=0.02)


def test_a_surface_coil_shades_the_image_and_parallel_imaging_raises_the_noise_at_the_centre():
    tissue = {"muscle": np.ones((2, 64, 64))}
    coil = _site({"kind": "SE", "tr_ms": 600, "te_ms": 15},
                 coil={"kind": "surface", "center_mm": [-40, 0], "falloff_mm": 30})
    shaded, _ = acquire(tissue, (1.0, 1.0, 1.0), coil)
    assert shaded[0, 2, 32] > 3 * shaded[0, 61, 32]  # bright near the coil (top), dark far from it
    noisy = _site({"kind": "SE", "tr_ms": 600, "te_ms": 15}, noise={"sigma": 0.02, "g_factor": 3.0})
    image, _ = acquire({"muscle": np.zeros((2, 64, 64))}, (1.0, 1.0, 1.0), noisy, seed=1)
    assert image[:, 24:40, 24:40].mean() > 2 * image[:, :6, :6].mean()  # noise floor higher at the centre


def test_the_same_site_and_seed_give_the_same_image_and_another_seed_another_noise():
    site = _site({"kind": "GRE", "tr_ms": 30, "te_ms": 5, "flip_deg": 20},
                 noise={"sigma": 0.01, "drift": 0.05, "spike": 0.2})
    tissue = {"grey_matter": np.ones((4, 64, 64))}
    a, _ = acquire(tissue, (1.0, 1.0, 1.0), site, seed=5)
    b, _ = acquire(tissue, (1.0, 1.0, 1.0), site, seed=5)
    c, _ = acquire(tissue, (1.0, 1.0, 1.0), site, seed=6)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


@pytest.mark.parametrize("change, message", [
    ({"sequence": {"kind": "SE", "tr_ms": 100, "te_ms": 120}}, "sequence.te_ms 120 must be shorter than tr_ms 100"),
    ({"sequence": {"kind": "GRE", "tr_ms": 20, "te_ms": 4, "flip_deg": 200}}, "sequence.flip_deg must be a number"),
    ({"sequence": {"kind": "IR", "tr_ms": 5000, "te_ms": 10}}, "sequence.ti_ms is required"),
    ({"sequence": {"kind": "SE", "tr_ms": 3000, "te_ms": 90, "ti_ms": 100}}, "sequence.ti_ms is for an inversion recovery"),
    ({"sequence": {"kind": "EPI", "tr_ms": 3000, "te_ms": 30}}, "sequence.kind must be SE, GRE or IR"),
    ({"field_t": 7.0}, "field_t must be one of \\[1.5, 3.0\\]"),
    ({"noise": {"sigma": -0.1}}, "noise.sigma must be a number"),
    ({"acquisition": {"fov_mm": [64, 64], "matrix": [8, 64], "slice_mm": 1.0}}, "acquisition.matrix\\[y\\]"),
    ({"coil": {"kind": "surface", "falloff_mm": 0}}, "coil.falloff_mm must be a number in \\(0"),
    ({"gradient": 3}, "unknown field\\(s\\) \\['gradient'\\]"),
])
def test_a_profile_value_out_of_its_physical_range_is_refused_naming_the_field(change, message):
    raw = {"name": "BAD", "field_t": 3.0, "sequence": {"kind": "SE", "tr_ms": 3000, "te_ms": 90},
           "acquisition": {"fov_mm": [64, 64], "matrix": [64, 64], "slice_mm": 1.0}, **change}
    with pytest.raises(ProfileError, match=f"site BAD: {message}"):
        MRSite.from_dict(raw)


def test_a_negative_relaxation_time_is_refused_naming_it():
    with pytest.raises(ProfileError, match="t2_ms must be a number in \\(0"):
        Relaxation(t1_ms=1000, t2_ms=-5, pd=0.8)


def test_an_acquisition_finer_than_the_simulation_grid_interpolates_and_keeps_the_mean():
    site = MRSite.from_dict({"name": "FINE", "field_t": 1.5, "sequence": {"kind": "SE", "tr_ms": 3000, "te_ms": 90},
                             "acquisition": {"fov_mm": [64, 64], "matrix": [128, 128], "slice_mm": 1.0}})
    image, spacing = acquire({"fluid": np.ones((2, 64, 64))}, (1.0, 1.0, 1.0), site)
    expected = 1000 * signal(TISSUES["fluid"][1.5], site.sequence)
    assert image.shape == (2, 128, 128) and spacing == (1.0, 0.5, 0.5) and np.allclose(image, expected, rtol=1e-5)
    assert isinstance(site.noise, Noise) and site.noise.sigma == 0
