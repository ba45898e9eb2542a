"""Properties of Fourier amplitude normalization (see shared design card harmofl.md)."""

import numpy as np
import pytest
import torch

from fedharmony.methods.harmofl.harmonize import (amplitude_normalize, batch_amplitude, mean_shift_reference, select_backend,
                                  spectrum_parts, window_radius)


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    images = torch.rand(4, 3, 32, 30, generator=g, dtype=torch.float64) + 0.5
    other = torch.rand(2, 3, 32, 30, generator=g, dtype=torch.float64) * 3
    return images, batch_amplitude(other)


def _full_window(h, w, ratio):
    b = window_radius(h, w, ratio)
    ky = torch.fft.fftfreq(h, 1 / h).abs()
    kx = torch.fft.fftfreq(w, 1 / w).abs()
    return (ky[:, None] <= b) & (kx[None, :] <= b)


@pytest.mark.parametrize("ratio", [0.0, 0.05, 0.1, 0.25, 0.5])
def test_window_takes_target_amplitude_outside_unchanged_phase_kept(batch, ratio):
    images, target = batch
    out = amplitude_normalize(images, target, ratio)
    assert out.shape == images.shape and out.dtype == images.dtype
    amp, phase = spectrum_parts(out)
    amp0, phase0 = spectrum_parts(images)
    m = _full_window(32, 30, ratio)
    torch.testing.assert_close(amp[:, :, m], target[:, m].expand_as(amp[:, :, m]), rtol=1e-9, atol=1e-8)
    torch.testing.assert_close(amp[:, :, ~m], amp0[:, :, ~m], rtol=1e-9, atol=1e-8)
    visible = m & (amp0 > 1e-6)  # (B, C, H, W): phase is only defined where there is amplitude
    dphase = torch.remainder(phase - phase0 + torch.pi, 2 * torch.pi) - torch.pi
    assert dphase[visible].abs().max() < 1e-8


def test_own_amplitude_is_identity(batch):
    images, _ = batch
    for i in range(len(images)):
        own = batch_amplitude(images[i:i + 1])
        torch.testing.assert_close(amplitude_normalize(images[i:i + 1], own, 0.3), images[i:i + 1])


def test_dc_only_is_a_per_channel_mean_shift(batch):
    images, target = batch
    signed = images - 1.2  # some channels with negative mean pick up the sign, as in the released code
    torch.testing.assert_close(amplitude_normalize(signed, target, 0.0), mean_shift_reference(signed, target))


def test_images_in_a_batch_do_not_influence_each_other(batch):
    images, target = batch
    together = amplitude_normalize(images, target, 0.2)
    for i in range(len(images)):
        torch.testing.assert_close(together[i:i + 1], amplitude_normalize(images[i:i + 1], target, 0.2))


def test_float32_matches_float64_reference(batch):
    images, target = batch
    out32 = amplitude_normalize(images.float(), target.float(), 0.1)
    ref = amplitude_normalize(images, target, 0.1)
    assert out32.dtype == torch.float32
    assert (out32.double() - ref).abs().max() / ref.abs().max() < 1e-5


def test_matches_a_per_image_numpy_fft_implementation(batch):
    """The released code's approach (fftshift, centred window, per image), as the speed benchmark runs it."""
    from benchmark_harmonize import numpy_per_image

    images, target = batch
    ref = numpy_per_image(images.numpy(), target.numpy(), 0.1)
    np.testing.assert_allclose(amplitude_normalize(images, target, 0.1).numpy(), ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("bad,match", [
    (lambda x, t: (x[0], t, 0.1), r"\(B, C, H, W\)"),
    (lambda x, t: (torch.where(x > 1.4, float("nan"), x), t, 0.1), "NaN"),
    (lambda x, t: (x, t[:, :-1], 0.1), "target must be"),
    (lambda x, t: (x, t, 0.6), "ratio"),
    (lambda x, t: (x, t, -0.1), "ratio"),
    (lambda x, t: (x.long(), t, 0.1), "floating point"),
])
def test_bad_input_is_named(batch, bad, match):
    images, target = batch
    with pytest.raises((ValueError, TypeError), match=match):
        amplitude_normalize(*bad(images, target))


def test_backend_choice_on_cpu_and_forced_cupy_without_gpu():
    assert select_backend(torch.device("cpu")) == "torch"
    with pytest.raises(RuntimeError, match="cupy"):
        select_backend(torch.device("cpu"), "cupy")
    with pytest.raises(ValueError, match="unknown FFT backend"):
        select_backend(torch.device("cpu"), "fftw")


def _cupy_gpu():
    try:
        import cupy

        return torch.cuda.is_available() and cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


@pytest.mark.gpu
@pytest.mark.skipif(not _cupy_gpu(), reason="needs a CUDA GPU with cupy installed (requirements-gpu.txt); "
                                             "the torch backend is tested on CPU above")
def test_cupy_and_torch_backends_agree(batch):
    images, target = batch
    x, t = images.float().cuda(), target.float().cuda()
    out_cupy = amplitude_normalize(x, t, 0.1, backend="cupy")
    out_torch = amplitude_normalize(x, t, 0.1, backend="torch")
    assert out_cupy.device == x.device and out_cupy.dtype == x.dtype
    assert (out_cupy - out_torch).abs().max() / out_torch.abs().max() < 1e-5
