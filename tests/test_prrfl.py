"""PRR-FL math: progressive Fourier aggregation, the stage machine and the stage losses."""

import numpy as np
import pytest
import torch

from fedharmony.methods.prrfl.deputy import (EXCHANGE, RECOVER, SUBLIMATE, check_alphas, distillation_kl, next_stage,
                               stage_losses)
from fedharmony.methods.prrfl.fourier_aggregation import (fourier_aggregate, low_frequency_mask, matrix_to_weight,
                                            mean_amplitudes, mix_amplitudes, ratio_schedule, weight_to_matrix)
from fedharmony.core.metrics import confusion, mean_f1


def _deputies(n, seed=0):
    rng = np.random.default_rng(seed)
    return [{"conv.weight": rng.normal(size=(6, 4, 3, 3)).astype(np.float32),
             "fc.weight": rng.normal(size=(3, 10)).astype(np.float32),
             "fc.bias": rng.normal(size=(3,)).astype(np.float32)} for _ in range(n)]


# ---------------------------------------------------------------- Fourier aggregation
def test_identical_deputies_come_back_unchanged():
    same = _deputies(1)[0]
    for ratio in (0.3, 0.7, 1.0):
        for out in fourier_aggregate([same] * 3, ratio):
            for k in same:
                np.testing.assert_allclose(out[k], same[k], atol=1e-5)
                assert out[k].dtype == same[k].dtype


def test_whole_spectrum_mask_gives_every_site_the_mean_amplitude_with_its_own_phase():
    deputies = _deputies(3)
    out = fourier_aggregate(deputies, ratio=1.0)
    for k in ("conv.weight", "fc.weight"):
        spectra = [np.fft.fft2(weight_to_matrix(d[k]).astype(np.float64)) for d in deputies]
        mean_amp = np.mean([np.abs(s) for s in spectra], axis=0)
        for own, result in zip(spectra, out):
            got = np.fft.fft2(weight_to_matrix(result[k]).astype(np.float64))
            np.testing.assert_allclose(np.abs(got), mean_amp, rtol=1e-4, atol=1e-4)
            np.testing.assert_allclose(np.exp(1j * np.angle(got)), np.exp(1j * np.angle(own)), atol=1e-3)
    np.testing.assert_allclose(out[0]["fc.bias"], np.mean([d["fc.bias"] for d in deputies], axis=0), rtol=1e-6)
    # own phase: the sites' deputies still differ
    assert not np.allclose(out[0]["conv.weight"], out[1]["conv.weight"])


def test_partial_mask_shares_only_low_frequencies():
    deputies = _deputies(2, seed=1)
    ratio = 0.5
    out = fourier_aggregate(deputies, ratio)
    k = "conv.weight"
    own = np.abs(np.fft.fft2(weight_to_matrix(deputies[0][k]).astype(np.float64)))
    mean_amp = np.mean([np.abs(np.fft.fft2(weight_to_matrix(d[k]).astype(np.float64))) for d in deputies], axis=0)
    got = np.abs(np.fft.fft2(weight_to_matrix(out[0][k]).astype(np.float64)))
    mask = low_frequency_mask(*own.shape, ratio)
    assert 0 < mask.mean() < 1 and mask[0, 0]  # DC is shared
    np.testing.assert_allclose(got[mask], mean_amp[mask], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got[~mask], own[~mask], rtol=1e-4, atol=1e-4)


def test_mask_is_a_centred_symmetric_box_so_results_are_real():
    for h, w, ratio in ((12, 24, 0.7), (3, 10, 0.5), (9, 9, 0.95), (8, 16, 1.0)):
        mask = low_frequency_mask(h, w, ratio)
        centred = np.fft.fftshift(mask)
        rows, cols = np.nonzero(centred)
        bh, bw = int(np.floor(h * ratio / 2)), int(np.floor(w * ratio / 2))
        assert rows.min() == max(h // 2 - bh, 0) and rows.max() == min(h // 2 + bh, h - 1)
        assert cols.min() == max(w // 2 - bw, 0) and cols.max() == min(w // 2 + bw, w - 1)
        # conjugate-symmetric: frequency (i, j) shared iff (-i, -j) is, so the inverse FFT is real
        flipped = mask[(-np.arange(h)) % h][:, (-np.arange(w)) % w]
        assert np.array_equal(mask, flipped)
    assert low_frequency_mask(7, 6, 1.0).all()


def test_broadcast_form_equals_per_site_form_with_the_released_shifted_layout():
    """What the NVFlare job does (server: mean amplitudes; site: mix) against a direct
    implementation of the card's recipe on fftshift-ed spectra."""
    deputies, ratio = _deputies(4, seed=2), 0.7
    broadcast = mean_amplitudes(deputies)
    for d in deputies:
        mine = mix_amplitudes(d, broadcast, ratio)
        m = weight_to_matrix(d["conv.weight"]).astype(np.float64)
        h, w = m.shape
        amps = [np.fft.fftshift(np.abs(np.fft.fft2(weight_to_matrix(x["conv.weight"]).astype(np.float64))))
                for x in deputies]
        a = np.fft.fftshift(np.abs(np.fft.fft2(m)))
        bh, bw = int(np.floor(h * ratio / 2)), int(np.floor(w * ratio / 2))
        box = (slice(h // 2 - bh, h // 2 + bh + 1), slice(w // 2 - bw, w // 2 + bw + 1))
        a[box] = np.mean(amps, axis=0)[box]
        ref = np.real(np.fft.ifft2(np.fft.ifftshift(a) * np.exp(1j * np.angle(np.fft.fft2(m)))))
        np.testing.assert_allclose(mine["conv.weight"], matrix_to_weight(ref, (6, 4, 3, 3)), rtol=1e-4, atol=1e-5)


def test_weighted_mean_and_any_number_of_sites():
    deputies = _deputies(5, seed=3)
    for n in (1, 2, 5):
        assert len(fourier_aggregate(deputies[:n], 0.8)) == n
    uniform = mean_amplitudes(deputies[:2])
    weighted = mean_amplitudes(deputies[:2], weights=[3, 1])
    np.testing.assert_allclose(weighted["fc.bias"], 0.75 * deputies[0]["fc.bias"] + 0.25 * deputies[1]["fc.bias"],
                               rtol=1e-5)
    assert not np.allclose(uniform["fc.weight"], weighted["fc.weight"])


def test_reshape_rules():
    w = np.arange(6 * 4 * 3 * 5).reshape(6, 4, 3, 5)  # (O, I, kh, kw)
    m = weight_to_matrix(w)
    assert m.shape == (4 * 3, 5 * 6)
    o, i, r, c = 2, 1, 2, 4
    assert m[i * 3 + r, c * 6 + o] == w[o, i, r, c]  # rows (in, kernel row), columns (kernel col, out)
    for shape in ((6, 4, 3, 5), (5, 3, 7), (4, 2, 3, 3, 3), (3, 10)):
        x = np.random.default_rng(0).normal(size=shape)
        assert np.array_equal(matrix_to_weight(weight_to_matrix(x), shape), x)
    assert weight_to_matrix(np.ones((3, 10))).shape == (3, 10)  # linear as is


def test_schedule_first_and_last_values():
    assert ratio_schedule(0, 50) == pytest.approx(0.7)
    assert ratio_schedule(49, 50) == pytest.approx(0.7 + 49 / 50 * 0.25)  # 0.945, as released
    assert ratio_schedule(0, 1, 0.6, 0.9) == pytest.approx(0.6)
    values = [ratio_schedule(t, 10) for t in range(10)]
    assert values == sorted(values)
    with pytest.raises(ValueError, match="outside the job's rounds"):
        ratio_schedule(10, 10)


@pytest.mark.parametrize("call,message", [
    (lambda: ratio_schedule(0, 10, r0=0.9, r1=0.8), "r0 = 0.9 > r1 = 0.8"),
    (lambda: ratio_schedule(0, 10, r0=0.0), r"r0 must be in \(0, 1\]"),
    (lambda: ratio_schedule(0, 10, r1=1.2), r"r1 must be in \(0, 1\]"),
    (lambda: fourier_aggregate(_deputies(2), ratio=1.5), r"ratio must be in \(0, 1\]"),
    (lambda: fourier_aggregate(_deputies(2), ratio=-0.1), r"ratio must be in \(0, 1\]"),
    (lambda: low_frequency_mask(4, 4, 0), r"ratio must be in \(0, 1\]"),
    (lambda: mean_amplitudes(_deputies(2), weights=[1, 0]), "positive finite weight"),
])
def test_bad_settings_are_refused(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_a_deputy_with_mismatched_shapes_is_named():
    deputies = _deputies(3)
    deputies[2]["conv.weight"] = np.zeros((6, 4, 5, 5), dtype=np.float32)
    with pytest.raises(ValueError, match=r"deputy of hospital-c: 'conv.weight' has shape \(6, 4, 5, 5\)"):
        mean_amplitudes(deputies, names=["hospital-a", "hospital-b", "hospital-c"])
    deputies = _deputies(2)
    del deputies[1]["fc.bias"]
    with pytest.raises(ValueError, match="deputy of site 1 does not match the others: missing"):
        mean_amplitudes(deputies)
    aggregate = mean_amplitudes(_deputies(2))
    with pytest.raises(ValueError, match="aggregate 'fc.weight' has shape"):
        mix_amplitudes({**_deputies(1)[0], "fc.weight": np.zeros((2, 10))}, aggregate, 0.7)


# ---------------------------------------------------------------- deputy-enhanced transfer
def test_stage_machine_on_scripted_scores():
    a1, a2 = 0.7, 0.9

    def run(scores):
        stage, out = None, []
        for f_p, f_d in scores:
            stage = next_stage(stage, f_p, f_d, a1, a2)
            out.append(stage)
        return out

    # the first epoch of a round is recover even with a perfect deputy; then exchange, then sublimate
    assert run([(0.8, 0.8), (0.8, 0.6), (0.8, 0.7), (0.8, 0.75)]) == [RECOVER, EXCHANGE, EXCHANGE, SUBLIMATE]
    # recover while the deputy is below alpha1 * f_p
    assert run([(1.0, 0.1), (1.0, 0.69), (1.0, 0.7)]) == [RECOVER, RECOVER, EXCHANGE]
    # back to exchange below alpha2, back to recover below alpha1
    assert run([(1.0, 1.0), (1.0, 1.0), (1.0, 0.95), (1.0, 0.85), (1.0, 0.5)]) == \
        [RECOVER, EXCHANGE, SUBLIMATE, EXCHANGE, RECOVER]
    with pytest.raises(ValueError, match="unknown stage"):
        next_stage("mutual", 1.0, 1.0)
    for bad in ((0.9, 0.7), (0.0, 0.9), (0.7, 1.1)):
        with pytest.raises(ValueError, match="alpha1 <= alpha2"):
            check_alphas(*bad)


def _grads(stage, seed=0):
    """Gradients of p and d (two tiny linear classifiers) after one step's losses in ``stage``."""
    torch.manual_seed(seed)
    p, d = torch.nn.Linear(5, 3), torch.nn.Linear(5, 3)
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    loss_p, loss_d = stage_losses(stage, torch.nn.CrossEntropyLoss(), p(x), d(x), y)
    (loss_p + loss_d).backward()
    return p, d, x, y, loss_p, loss_d


def _ce_grad(model, x, y):
    model.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    return model.weight.grad.clone()


@pytest.mark.parametrize("stage,p_distils,d_distils", [
    (RECOVER, False, True), (EXCHANGE, True, True), (SUBLIMATE, True, False)])
def test_stage_losses_on_a_tiny_model(stage, p_distils, d_distils):
    p, d, x, y, loss_p, loss_d = _grads(stage)
    g_p, g_d = p.weight.grad.clone(), d.weight.grad.clone()
    ce_p = torch.nn.functional.cross_entropy(p(x), y)
    ce_d = torch.nn.functional.cross_entropy(d(x), y)
    kl_pd = distillation_kl(p(x), d(x))
    kl_dp = distillation_kl(d(x), p(x))
    assert loss_p.item() == pytest.approx((ce_p + (kl_pd if p_distils else 0)).item(), rel=1e-5)
    assert loss_d.item() == pytest.approx((ce_d + (kl_dp if d_distils else 0)).item(), rel=1e-5)
    # the teacher is detached: a model's gradient is its CE gradient unless it is the student
    assert torch.allclose(g_p, _ce_grad(p, x, y), atol=1e-6) != p_distils
    assert torch.allclose(g_d, _ce_grad(d, x, y), atol=1e-6) != d_distils


def test_distillation_kl_is_zero_for_equal_logits_and_positive_otherwise():
    a = torch.randn(4, 3)
    assert float(distillation_kl(a, a)) == pytest.approx(0.0, abs=1e-7)
    assert float(distillation_kl(a, torch.randn(4, 3))) > 0
    seg = torch.randn(2, 2, 5, 5)
    assert distillation_kl(seg, torch.randn(2, 2, 5, 5)).ndim == 0  # per-pixel mean for segmentation


def test_scores_macro_f1_and_dice_from_the_confusion_matrix():
    logits = torch.tensor([[2.0, 0, 0], [0, 2, 0], [0, 2, 0], [0, 0, 2]])
    labels = torch.tensor([0, 1, 2, 2])
    cm = confusion(logits, labels)
    assert cm.tolist() == [[1, 0, 0], [0, 1, 0], [0, 1, 1]]
    assert mean_f1(cm) == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)  # per class 2TP / (2TP + FP + FN)
    seg = torch.zeros(1, 2, 2, 2)
    seg[0, 1, 0] = 5  # predicts foreground on the top row
    mask = torch.tensor([[[[1.0, 0], [0, 0]]]])
    assert mean_f1(confusion(seg, mask), include_background=False) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="class indices"):
        confusion(logits, torch.tensor([0, 1, 2, 3]))


# ---------------------------------------------------------------- the NVFlare aggregator
def test_fourier_aggregator_broadcasts_mean_amplitudes_and_the_round_ratio():
    from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
    from nvflare.app_common.app_constant import AppConstants
    from nvflare.apis.fl_context import FLContext

    from fedharmony.core.aggregation import expected_shapes
    from fedharmony.methods.prrfl.server import FOURIER_RATIO, FourierAggregator

    deputies = _deputies(3, seed=4)
    for d in deputies:
        d["bn.running_mean"] = np.ones(6, dtype=np.float32)  # a norm layer: stays on the sites
    agg = FourierAggregator(num_rounds=10, local_keys=r"(^|\.)bn\.")
    agg._expected = expected_shapes(deputies[0], agg.local_keys)
    agg.fl_ctx = FLContext()
    agg.fl_ctx.set_prop(AppConstants.CURRENT_ROUND, 4, private=True, sticky=False)
    for i, d in enumerate(deputies):
        agg.accept_model(FLModel(params=d, params_type=ParamsType.FULL, meta={"client_name": f"site-{i + 1}"}))
    bad = dict(deputies[0], **{"fc.weight": np.zeros((4, 10), dtype=np.float32)})
    agg.accept_model(FLModel(params=bad, params_type=ParamsType.FULL, meta={"client_name": "site-9"}))
    agg.accept_model(FLModel(params=deputies[0], params_type=ParamsType.DIFF, meta={"client_name": "site-8"}))
    out = agg.aggregate_model()
    assert out.meta[FOURIER_RATIO] == pytest.approx(ratio_schedule(4, 10))
    assert out.meta["nr_aggregated"] == 3 and set(out.meta["rejected"]) == {"site-8", "site-9"}
    assert "shape" in out.meta["rejected"]["site-9"] and "full deputy" in out.meta["rejected"]["site-8"]
    assert "bn.running_mean" not in out.params
    expected = mean_amplitudes([{k: v for k, v in d.items() if not k.startswith("bn")} for d in deputies])
    for k, v in expected.items():
        np.testing.assert_allclose(out.params[k], v, rtol=1e-6)
    agg.reset_stats()
    with pytest.raises(RuntimeError, match="no site update"):
        agg.aggregate_model()


def test_the_released_half_open_box_shares_one_bin_fewer_per_axis_off_centre():
    from fedharmony.methods.prrfl.fourier_aggregation import low_frequency_mask, mix_amplitude

    # 8 x 8, ratio 0.5: b = floor(8 * 0.5 / 2) = 2 around DC at index 4 (centred spectrum)
    sym = np.fft.fftshift(low_frequency_mask(8, 8, 0.5))
    half = np.fft.fftshift(low_frequency_mask(8, 8, 0.5, box="half_open"))
    assert sym.sum() == 25 and half.sum() == 16  # shared fraction 25/64 against 16/64
    assert half[2:6, 2:6].all() and not half[6, 4] and not half[4, 6]  # [c-2, c+2): +b is out, -b in
    assert sym[2:7, 2:7].all()
    # the half-open box breaks conjugate symmetry: the mixed matrix differs from the symmetric one's
    rng = np.random.default_rng(0)
    own, other = rng.normal(size=(8, 8)), np.abs(np.fft.fft2(rng.normal(size=(8, 8))))
    assert not np.allclose(mix_amplitude(own, other, 0.5), mix_amplitude(own, other, 0.5, box="half_open"))
    with pytest.raises(ValueError, match=r"box must be one of \['symmetric', 'half_open'\], got 'open'"):
        low_frequency_mask(8, 8, 0.5, box="open")


def test_the_released_batchmean_kl_is_hw_times_ours_for_segmentation_and_equal_for_classification():
    torch.manual_seed(0)
    seg_s, seg_t = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5)
    # by hand: the per-pixel KL summed over all pixels of the batch, divided by the batch size
    p = torch.softmax(seg_t, 1)
    by_hand = (p * (torch.log_softmax(seg_t, 1) - torch.log_softmax(seg_s, 1))).sum() / 2
    assert float(distillation_kl(seg_s, seg_t, "batchmean")) == pytest.approx(float(by_hand), rel=1e-6)
    assert float(distillation_kl(seg_s, seg_t, "batchmean")) == pytest.approx(
        20 * float(distillation_kl(seg_s, seg_t)), rel=1e-6)
    cls_s, cls_t = torch.randn(4, 3), torch.randn(4, 3)
    assert float(distillation_kl(cls_s, cls_t, "batchmean")) == pytest.approx(float(distillation_kl(cls_s, cls_t)))
    # PyTorch's own batchmean agrees
    ref = torch.nn.functional.kl_div(torch.log_softmax(seg_s, 1), torch.softmax(seg_t, 1), reduction="batchmean")
    assert float(distillation_kl(seg_s, seg_t, "batchmean")) == pytest.approx(float(ref), rel=1e-6)
    with pytest.raises(ValueError, match=r"KL reduction must be one of \('mean', 'batchmean'\), got 'sum'"):
        distillation_kl(cls_s, cls_t, "sum")
