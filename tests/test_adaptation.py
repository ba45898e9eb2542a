"""IOP-FL test-time adaptation: losses, the adaptation loop, the model pool and the routed bundle config."""

import copy
import json
import math
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import DataLoader, Dataset
from monai.transforms import Compose, EnsureChannelFirstd, EnsureTyped, LoadImaged, NormalizeIntensityd

from conftest import BUNDLE, TINY_OVERRIDES
from fedharmony.methods.iopfl.adaptation import (TestTimeAdapter, UnsupervisedLoss, augment, boundary_loss, build_test_time_network,
                                   entropy_loss, mean_state_dict)
from fedharmony.bundle.networks import build_network
from fedharmony.methods.iopfl.model_pool import load_pool, write_pool
from fedharmony.methods.iopfl.routing import routed_layers


def test_entropy_is_log_c_for_uniform_and_zero_for_confident_predictions():
    assert entropy_loss(torch.zeros(2, 3, 4, 4)).item() == pytest.approx(math.log(3))
    confident = torch.zeros(2, 2, 4, 4)
    confident[:, 1] = 50.0
    assert entropy_loss(confident).item() < 1e-6


def test_boundary_term_is_zero_for_flat_maps_and_grows_with_fragmentation():
    flat = torch.zeros(1, 2, 32, 32)
    assert boundary_loss(flat).item() == 0.0
    yy, xx = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
    disk = ((yy - 16) ** 2 + (xx - 16) ** 2 < 64).float()
    speckle = (torch.rand(32, 32, generator=torch.Generator().manual_seed(0)) < disk.mean()).float()

    def logits(mask):
        return torch.stack([-10 * mask, 10 * mask])[None]

    assert 0 < boundary_loss(logits(disk), 5) < boundary_loss(logits(speckle), 5)
    with pytest.raises(ValueError, match="odd"):
        boundary_loss(flat, 4)


def test_augmentation_is_undone_by_its_inverse():
    x = torch.randn(2, 3, 16, 16)
    g = torch.Generator().manual_seed(0)
    for _ in range(8):
        u, inverse = augment(x, g, noise_std=0.0)
        torch.testing.assert_close(inverse(u), x)
    u, inverse = augment(torch.randn(1, 1, 16, 24), g, 0.0)  # non-square: only even rotations
    assert u.shape == (1, 1, 16, 24)


def _tiny_experts(n=3):
    experts = [build_network(str(BUNDLE), overrides=TINY_OVERRIDES, seed=s) for s in range(n)]
    return experts


def _write_tiny_pool(path, n=3, overrides=TINY_OVERRIDES):
    experts = _tiny_experts(n)
    personalized = {f"site-{i + 1}": e.state_dict() for i, e in enumerate(experts[:-1])}
    return write_pool(path, experts[-1].state_dict(), personalized, overrides=overrides,
                      info={"site-1": {"data": "BIDMC"}})


def _volume_loader(site_dir):
    files = [{"image": str(p)} for p in sorted(site_dir.glob("Case??.nii.gz"))]
    transform = Compose([LoadImaged("image", image_only=True), EnsureChannelFirstd("image"),
                         NormalizeIntensityd("image"), EnsureTyped("image", dtype=torch.float32)])
    return DataLoader(Dataset(files, transform), batch_size=1)


@pytest.mark.parametrize("method", ["routing", "routing_source_stats"])
def test_adaptation_lowers_its_own_loss_and_changes_only_gates_and_norm_affine(tiny_sites, tmp_path, method):
    _write_tiny_pool(tmp_path / "pool")
    pool = load_pool(tmp_path / "pool", BUNDLE)
    net = build_test_time_network(pool, method)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    loader = _volume_loader(tiny_sites / "HK")  # images only: no label is ever loaded

    def loss_now():
        fixed = UnsupervisedLoss(seed=123)  # the same augmentations before and after
        with torch.no_grad():
            return sum(float(fixed(net, x)[0]) for x in TestTimeAdapter(net, loader, min_size=32)._chunks())

    start = loss_now()
    adapter = TestTimeAdapter(net, loader, passes=4, lr=1e-2, expert_names=pool.names, min_size=32,
                              log_file=str(tmp_path / "log.json"))
    history = adapter.run()
    assert loss_now() < start
    assert [h["pass"] for h in history] == [1, 2, 3, 4]
    assert set(history[-1]["routing_weights"]) == {"site-1", "site-2", "global"}
    assert json.loads((tmp_path / "log.json").read_text()) == history

    after = net.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".gate." in k or k.endswith((".adn.N.weight", ".adn.N.bias")) for k in changed)
    assert any(".gate." in k for k in changed) and any(".adn.N." in k for k in changed)
    assert all(torch.equal(before[k], after[k]) for k in before if k.endswith("expert_weight"))
    if method == "routing_source_stats":  # the global model's statistics, never re-estimated
        assert any(k.endswith("running_mean") for k in before)
    else:
        assert not any(k.endswith("running_mean") for k in before)


def test_comparison_networks(tmp_path):
    _write_tiny_pool(tmp_path / "pool")
    pool = load_pool(tmp_path / "pool", BUNDLE)
    tent = build_test_time_network(pool, "tent")
    assert {n for n, p in tent.named_parameters() if p.requires_grad} and not routed_layers(tent)
    assert all(".adn.N." in n for n, p in tent.named_parameters() if p.requires_grad)
    assert not any(p.requires_grad for p in build_test_time_network(pool, "bn_stats").parameters())
    mean = build_test_time_network(pool, "expert_mean").state_dict()
    expected = mean_state_dict(pool.experts)
    assert all(torch.equal(mean[k], expected[k]) for k in expected)
    one = build_test_time_network(pool, "site-2").state_dict()
    assert all(torch.equal(one[k], v) for k, v in pool.experts[1].state_dict().items())
    with pytest.raises(ValueError, match="unknown test-time method"):
        build_test_time_network(pool, "site-9")


def test_a_too_small_volume_is_left_out_of_adaptation_and_named_by_the_routed_bundle(tmp_path):
    _write_tiny_pool(tmp_path / "pool")
    net = build_test_time_network(load_pool(tmp_path / "pool", BUNDLE), "routing")
    small = tmp_path / "small"
    small.mkdir()
    nib.save(nib.Nifti1Image(np.random.rand(20, 20, 4).astype(np.float32), np.eye(4)), str(small / "tiny.nii.gz"))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    history = TestTimeAdapter(net, _volume_loader_any(small), passes=1, min_size=32).run()
    assert history[0]["steps"] == 0
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # nothing to adapt on: unchanged
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file",
           str(BUNDLE / "configs" / "routed_inference.json"), "--bundle_root", str(BUNDLE),
           "--pool_dir", str(tmp_path / "pool"), "--dataset_dir", str(small), "--output_dir", str(tmp_path / "out"),
           "--method", "routing"]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 1, res.stderr[-2000:]
    assert "processed 0, skipped 1" in res.stdout and "tiny.nii.gz" in res.stdout and "at least 32 x 32" in res.stdout
    (tmp_path / "empty").mkdir()
    res = subprocess.run(cmd[:-4] + ["--dataset_dir", str(tmp_path / "empty"), "--output_dir", str(tmp_path / "o2")],
                         capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 1 and "no input found in" in res.stdout, res.stdout[-1000:] + res.stderr[-1000:]


def _volume_loader_any(folder):
    files = [{"image": str(p)} for p in sorted(folder.glob("*.nii.gz"))]
    return DataLoader(Dataset(files, Compose([LoadImaged("image", image_only=True), EnsureChannelFirstd("image")])),
                      batch_size=1)


@pytest.mark.parametrize("method", ["routing", "routing_safe", "routing_safe_consensus", "routing_safe_departure",
                                    "routing_safe_labelled", "routing_online"])
def test_routed_inference_with_the_monai_bundle_cli(tiny_sites, tmp_path, method):
    """A site that never trained: adapt over the pool, write masks with the input geometry, log the routing
    (routing_safe with the released entropy scale: and the safeguard's decision; routing_safe_consensus: the
    consensus criterion; routing_safe_departure: the departure criterion; routing_safe_labelled: the site's one
    labelled volume, from labelled_dir, is the one held out and judges; routing_online: the released schedule,
    one step per batch of 5 slices during inference, no pass before)."""
    _write_tiny_pool(tmp_path / "pool")
    out = tmp_path / "masks"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file",
           str(BUNDLE / "configs" / "routed_inference.json"), "--bundle_root", str(BUNDLE),
           "--pool_dir", str(tmp_path / "pool"), "--dataset_dir", str(tiny_sites / "BIDMC"), "--output_dir", str(out),
           "--adaptation#passes", "2", "--method", method.split("_consensus")[0].split("_departure")[0]
           .split("_labelled")[0].split("_online")[0]]
    if method == "routing_safe":
        cmd += ["--adaptation#entropy", "released"]
    if method in ("routing_safe_consensus", "routing_safe_departure", "routing_safe_labelled"):
        cmd += ["--adaptation#safeguard", method.rsplit("_", 1)[1]]
    if method == "routing_safe_labelled":  # the second volume is the labelled one (not the one held out by position)
        (tmp_path / "labels").mkdir()
        label = tiny_sites / "BIDMC" / "Case01_segmentation.nii.gz"
        (tmp_path / "labels" / label.name).write_bytes(label.read_bytes())
        cmd += ["--labelled_dir", str(tmp_path / "labels")]
    if method == "routing_online":
        cmd += ["--adaptation#schedule", "online"]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    log = res.stdout + res.stderr
    inputs = sorted((tiny_sites / "BIDMC").glob("Case??.nii.gz"))
    if method == "routing_online":  # tiny volumes have 8 slices: 2 batches (5 + 3) per volume, one step each
        assert "adaptation pass" not in log and "online adaptation: one step per batch of 5 slices" in log
        assert f"online adaptation: {2 * len(inputs)} steps" in log
        assert len(list(out.glob("*_seg.nii.gz"))) == len(inputs)
        return
    assert "adaptation pass 2/2" in log and "routing weights site-1" in log
    history = json.loads((out / "adaptation.json").read_text())
    assert set(history[0]["routing_weights"]) == {"site-1", "site-2", "global"}
    if method == "routing_safe_labelled":  # the labelled volume was held out and judged with its label
        decision = history[-1]["safeguard"]
        assert len(history) == 3 and decision["criterion"] == "labelled"
        assert decision["labelled_volumes"] == ["Case01"] and decision["held_out_volumes"] == 1
        assert 0.0 <= decision["candidate_dice"] <= 1.0 and 0.0 <= decision["global_dice"] <= 1.0
        assert "1 of 3 volumes have a label" in log and "held-out Dice with the site's labels" in log
    elif method.startswith("routing_safe"):  # the first of the 3 volumes was held out, the decision logged and kept
        assert len(history) == 3 and history[-1]["safeguard"]["held_out_chunks"] == 1
        criterion = method.rsplit("_", 1)[1] if method != "routing_safe" else "loss"
        assert history[-1]["safeguard"]["criterion"] == criterion
        assert ("adaptation safeguard: held-out " + ("loss" if criterion == "loss"
                                                     else "agreement with the pool's consensus")) in log
    else:
        assert len(history) == 2
    assert len(list(out.glob("*_seg.nii.gz"))) == len(inputs)
    for vol in inputs:
        src, seg = nib.load(str(vol)), nib.load(str(out / vol.name.replace(".nii.gz", "_seg.nii.gz")))
        assert seg.shape == src.shape
        np.testing.assert_allclose(seg.affine, src.affine, atol=1e-4)
        assert set(np.unique(np.asarray(seg.dataobj))) <= {0, 1}


def test_routed_inference_refuses_a_label_that_matches_no_volume_before_any_work(tiny_sites, tmp_path):
    """routing_safe's labelled criterion through the bundle CLI: a label named after no input (a typo) stops the
    run before adaptation, naming the file and the inputs; no mask is written."""
    _write_tiny_pool(tmp_path / "pool")
    (tmp_path / "labels").mkdir()
    label = tiny_sites / "BIDMC" / "Case01_segmentation.nii.gz"
    (tmp_path / "labels" / "Case1_segmentation.nii.gz").write_bytes(label.read_bytes())
    out = tmp_path / "masks"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file",
           str(BUNDLE / "configs" / "routed_inference.json"), "--bundle_root", str(BUNDLE),
           "--pool_dir", str(tmp_path / "pool"), "--dataset_dir", str(tiny_sites / "BIDMC"), "--output_dir", str(out),
           "--method", "routing_safe", "--adaptation#safeguard", "labelled", "--labelled_dir", str(tmp_path / "labels")]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode != 0
    assert "match no input: Case1_segmentation.nii.gz (inputs: Case00, Case01, Case02)" in res.stderr
    assert not list(out.glob("*_seg.nii.gz"))


def _useless(network):
    """The network with every parameter zeroed: logits 0 for every pixel, p = 1/2 (the unsupervised loss's
    entropy at its maximum, ln 2), whatever the input."""
    import copy

    net = copy.deepcopy(network)
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
    return net


@pytest.mark.parametrize("useless", ["candidate", "global"])
def test_the_safeguard_keeps_the_network_with_the_lower_held_out_loss(tiny_sites, tmp_path, useless):
    # "candidate": routing over a pool whose experts are made useless falls back to the (intact) global model;
    # "global": a useless fallback leaves the adapted network in place
    from fedharmony.methods.iopfl.adaptation import FallbackNetwork

    _write_tiny_pool(tmp_path / "pool")
    pool = load_pool(tmp_path / "pool", BUNDLE)
    from fedharmony.methods.iopfl.routing import build_routed_network

    experts = [_useless(e) for e in pool.experts] if useless == "candidate" else pool.experts
    glob = build_test_time_network(pool, "global")
    # margin 0: these untrained experts are barely better than useless ones (their entropy is near ln 2 too)
    guarded = FallbackNetwork(build_routed_network(experts), _useless(glob) if useless == "global" else glob,
                              margin=0.0, holdout_every=2)
    loader = _volume_loader(tiny_sites / "HK")
    history = TestTimeAdapter(guarded, loader, passes=1, lr=1e-3, min_size=32,
                              log_file=str(tmp_path / "log.json")).run()
    decision = history[-1]["safeguard"]
    assert decision["held_out_chunks"] >= 1 and decision["kept"] == ("global" if useless == "candidate" else "adapted")
    assert guarded.use_fallback == (useless == "candidate")
    x = next(TestTimeAdapter(guarded, loader, min_size=32)._chunks())
    with torch.no_grad():  # the forward goes to the network kept
        kept = guarded.fallback if guarded.use_fallback else guarded.candidate
        torch.testing.assert_close(guarded(x), kept(x))
    assert json.loads((tmp_path / "log.json").read_text())[-1]["safeguard"] == decision


def test_pooled_dice_of_two_label_maps_by_hand():
    from fedharmony.methods.iopfl.adaptation import mask_agreement, pooled_dice

    a, b = torch.tensor([0, 1, 1, 0]), torch.tensor([0, 1, 0, 0])
    counts = mask_agreement(a, b, 2)
    assert counts.tolist() == [[1, 3]] and pooled_dice(counts) == pytest.approx(2 / 3)
    # summed over chunks: a second chunk where both agree on 2 pixels -> (2 * 3) / (3 + 4) pooled, not a mean of Dice
    both = mask_agreement(torch.tensor([1, 1]), torch.tensor([1, 1]), 2)
    assert pooled_dice(counts + both) == pytest.approx(6 / 7)
    # 3 classes, class 2 in neither map: it counts as full agreement
    assert pooled_dice(mask_agreement(a, b, 3)) == pytest.approx((2 / 3 + 1.0) / 2)
    with pytest.raises(ValueError, match="label maps of different shapes"):
        mask_agreement(a, b[:3], 2)


class _Threshold(torch.nn.Module):
    """Foreground where the middle input channel is above ``t``: a network with a known mask and no parameter
    (logits steep enough that the softmax is 0 or 1, so the mean softmax of several is their majority vote)."""

    def __init__(self, t):
        super().__init__()
        self.t = t

    def forward(self, x):
        z = 1e4 * (x[:, 1:2] - self.t)
        return torch.cat([-z, z], 1)


@pytest.mark.parametrize("candidate_t, fallback_t, kept", [
    (0.5, 1e9, "adapted"),   # the global model finds nothing, the candidate matches the pool's consensus
    (1e9, 0.5, "global"),    # the adapted network collapsed to empty masks: fall back
    (0.5, 0.5, "global"),    # a tie goes to the global model
])
def test_the_consensus_safeguard_keeps_the_network_that_agrees_more_with_the_pool(tiny_sites, candidate_t,
                                                                                  fallback_t, kept):
    from fedharmony.methods.iopfl.adaptation import FallbackNetwork

    reference = [_Threshold(0.5), _Threshold(0.5), _Threshold(1e9)]  # a majority of 2 of 3 sets the reference
    guarded = FallbackNetwork(_Threshold(candidate_t), _Threshold(fallback_t), criterion="consensus",
                              reference=reference, holdout_every=2)
    history = TestTimeAdapter(guarded, _volume_loader(tiny_sites / "HK"), passes=1, min_size=32).run()
    decision = history[-1]["safeguard"]
    assert decision["criterion"] == "consensus" and decision["kept"] == kept and decision["held_out_chunks"] >= 1
    assert decision["reference_networks"] == 3 and "agreement with the pool's consensus" in decision["reason"]
    agreement = {0.5: 1.0, 1e9: 0.0}  # with the majority's mask: identical, or no foreground at all
    assert decision["candidate_agreement"] == pytest.approx(agreement[candidate_t])
    assert decision["global_agreement"] == pytest.approx(agreement[fallback_t])
    assert guarded.use_fallback == (kept == "global")


def test_the_departure_rule_by_hand():
    from fedharmony.methods.iopfl.adaptation import departure_keeps

    assert departure_keeps(0.86, 0.89)            # 0.86 >= 0.89 x 0.95 = 0.8455: not a clear departure
    assert departure_keeps(0.90, 0.90)            # a tie keeps the adapted network (consensus: the global one)
    assert not departure_keeps(0.84, 0.89)        # 0.84 < 0.8455
    assert not departure_keeps(0.0, 0.30)         # a collapse to empty masks
    assert departure_keeps(0.0, 0.0)              # neither agrees: nothing shows the adapted network is worse
    assert not departure_keeps(0.86, 0.89, margin=0.0)


@pytest.mark.parametrize("candidate_t, fallback_t, kept", [
    (1e9, 0.5, "global"),    # the adapted network collapsed to empty masks: fall back
    (0.5, 0.5, "adapted"),   # a tie keeps the adapted network: no clear departure from the pool
    (0.5, 1e9, "adapted"),   # the global model finds nothing
])
def test_the_departure_safeguard_falls_back_only_when_the_adapted_network_leaves_the_pool(tiny_sites, tmp_path,
                                                                                          candidate_t, fallback_t,
                                                                                          kept):
    from fedharmony.methods.iopfl.adaptation import FallbackNetwork

    reference = [_Threshold(0.5), _Threshold(0.5), _Threshold(1e9)]
    guarded = FallbackNetwork(_Threshold(candidate_t), _Threshold(fallback_t), criterion="departure",
                              reference=reference, holdout_every=2)
    history = TestTimeAdapter(guarded, _volume_loader(tiny_sites / "HK"), passes=1, min_size=32,
                              log_file=str(tmp_path / "log.json")).run()
    decision = history[-1]["safeguard"]
    assert decision["criterion"] == "departure" and decision["kept"] == kept and decision["held_out_chunks"] >= 1
    assert decision["margin"] == 0.05 and decision["reference_networks"] == 3
    assert guarded.use_fallback == (kept == "global")
    assert ("not more than 5% lower" if kept == "adapted" else "more than 5% lower") in decision["reason"]
    assert json.loads((tmp_path / "log.json").read_text())[-1]["safeguard"] == decision


def test_foreground_counts_and_volume_dice_by_hand():
    from fedharmony.methods.iopfl.adaptation import foreground_counts, volume_dice

    prediction, label = torch.tensor([0, 1, 1, 0]), torch.tensor([0, 2, 0, 0])  # any class > 0 is foreground
    counts = foreground_counts(prediction, label)
    assert counts.tolist() == [1, 3] and volume_dice(counts) == pytest.approx(2 / 3)
    assert volume_dice(foreground_counts(torch.zeros(4), torch.zeros(4))) == 1.0  # both empty: the study's rule
    assert volume_dice(foreground_counts(torch.zeros(4), label)) == 0.0
    with pytest.raises(ValueError, match="label maps of different shapes"):
        foreground_counts(prediction, label[:3])


def _labelled_loader(site_dir, labelled):
    """The site's volumes as routed inference gives them, with a label on the volumes named in ``labelled``."""
    files = [{"image": str(p), "name": p.name[:-7],
              **({"label": str(p).replace(".nii.gz", "_segmentation.nii.gz")} if p.name[:-7] in labelled else {})}
             for p in sorted(site_dir.glob("Case??.nii.gz"))]
    transform = Compose([LoadImaged(["image", "label"], image_only=True, allow_missing_keys=True),
                         EnsureChannelFirstd(["image", "label"], allow_missing_keys=True),
                         NormalizeIntensityd("image"), EnsureTyped("image", dtype=torch.float32)])
    return DataLoader(Dataset(files, transform), batch_size=1)


def _threshold_dice(site_dir, case, t):
    """Foreground Dice of ``_Threshold(t)`` on one z-scored volume, by hand with NumPy."""
    image = np.asarray(nib.load(str(site_dir / f"{case}.nii.gz")).dataobj, dtype=np.float64)
    image = (image - image.mean()) / image.std()
    label = np.asarray(nib.load(str(site_dir / f"{case}_segmentation.nii.gz")).dataobj) > 0
    mask = image > t
    return 2.0 * (mask & label).sum() / (mask.sum() + label.sum())


@pytest.mark.parametrize("candidate_t, fallback_t, kept", [
    (0.5, 1e9, "adapted"),   # the global model finds nothing: Dice 0 on every labelled volume
    (1e9, 0.5, "global"),    # the adapted network collapsed to empty masks
    (0.5, 0.5, "global"),    # a tie goes to the global model
])
def test_the_labelled_safeguard_keeps_the_network_with_the_higher_dice_on_the_labelled_volumes(
        tiny_sites, tmp_path, candidate_t, fallback_t, kept):
    from fedharmony.methods.iopfl.adaptation import FallbackNetwork

    site = tiny_sites / "HK"
    guarded = FallbackNetwork(_Threshold(candidate_t), _Threshold(fallback_t), criterion="labelled")
    adapter = TestTimeAdapter(guarded, _labelled_loader(site, {"Case01", "Case02"}), passes=1, min_size=32,
                              log_file=str(tmp_path / "log.json"))
    # held out: the labelled volumes, not the positional ones (the first and every holdout_every-th)
    assert [name for name, _, _ in adapter._volumes(held_out=True)] == ["Case01", "Case02"]
    assert [name for name, _, _ in adapter._volumes(held_out=False)] == ["Case00"]
    decision = adapter.run()[-1]["safeguard"]
    assert decision["criterion"] == "labelled" and decision["kept"] == kept
    assert decision["labelled_volumes"] == ["Case01", "Case02"] and decision["held_out_volumes"] == 2
    by_hand = {t: sum(_threshold_dice(site, c, t) for c in ("Case01", "Case02")) / 2 if t < 1e9 else 0.0
               for t in (0.5, 1e9)}
    assert by_hand[0.5] > 0.0  # the case is a real test: the threshold finds part of the gland
    assert decision["candidate_dice"] == pytest.approx(by_hand[candidate_t], abs=1e-6)
    assert decision["global_dice"] == pytest.approx(by_hand[fallback_t], abs=1e-6)
    assert guarded.use_fallback == (kept == "global") and "margin" not in decision
    assert json.loads((tmp_path / "log.json").read_text())[-1]["safeguard"] == decision


def test_the_labelled_safeguard_without_a_labelled_volume_falls_back_and_says_why(tiny_sites):
    from fedharmony.methods.iopfl.adaptation import FallbackNetwork

    guarded = FallbackNetwork(_Threshold(0.5), _Threshold(1e9), criterion="labelled")
    decision = TestTimeAdapter(guarded, _labelled_loader(tiny_sites / "HK", set()), passes=1,
                               min_size=32).run()[-1]["safeguard"]
    assert decision["kept"] == "global" and decision["held_out_volumes"] == 0
    assert decision["reason"] == "no labelled volume to judge the adaptation on"


def test_inputs_for_reads_labels_only_for_the_labelled_criterion(tiny_sites, tmp_path, caplog):
    from fedharmony.data.images import find_inputs
    from fedharmony.methods.iopfl.adaptation import inputs_for

    inputs, _ = find_inputs(tiny_sites / "BIDMC")
    labels = tmp_path / "labels"
    labels.mkdir()
    label = tiny_sites / "BIDMC" / "Case02_segmentation.nii.gz"
    (labels / label.name).write_bytes(label.read_bytes())
    items = inputs_for(inputs, "routing_safe", "labelled", str(labels))
    assert [("label" in i) for i in items] == [False, False, True]
    assert items[2]["label"] == str(labels / "Case02_segmentation.nii.gz")
    with pytest.raises(ValueError, match="needs labelled_dir"):
        inputs_for(inputs, "routing_safe", "labelled", "")
    with pytest.raises(ValueError, match="safeguard criterion must be one of"):
        inputs_for(inputs, "routing_safe", "labeled", str(labels))
    with caplog.at_level("WARNING"):
        assert inputs_for(inputs, "routing", "labelled", str(labels)) == inputs  # no label for another method
    assert "is not read" in caplog.text


def test_the_consensus_safeguard_on_a_pool_uses_every_network_on_batch_statistics(tmp_path):
    from fedharmony.methods.iopfl.adaptation import FallbackNetwork

    _write_tiny_pool(tmp_path / "pool")
    pool = load_pool(tmp_path / "pool", BUNDLE)
    net = build_test_time_network(pool, "routing_safe", safeguard="consensus")
    assert isinstance(net, FallbackNetwork) and net.criterion == "consensus"
    assert len(net.reference) == len(pool.experts)
    norms = [m for r in net.reference for m in r.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert norms and all(m.running_mean is None and not m.track_running_stats for m in norms)
    assert not any(p.requires_grad for p in net.reference.parameters())
    assert build_test_time_network(pool, "routing_safe").criterion == "loss"  # the default is unchanged
    with pytest.raises(ValueError, match="safeguard criterion must be one of "
                                         "\\['loss', 'consensus', 'departure', 'labelled'\\], got 'dice'"):
        build_test_time_network(pool, "routing_safe", safeguard="dice")
    with pytest.raises(ValueError, match="consensus safeguard needs the pool's networks"):
        FallbackNetwork(net.candidate, net.fallback, criterion="consensus")
    departure = build_test_time_network(pool, "routing_safe", safeguard="departure")
    assert departure.criterion == "departure" and len(departure.reference) == len(pool.experts)
    with pytest.raises(ValueError, match="departure safeguard needs the pool's networks"):
        FallbackNetwork(net.candidate, net.fallback, criterion="departure")


def test_the_released_entropy_scale_is_b_over_c_ln2_times_ours():
    from fedharmony.methods.iopfl.adaptation import entropy_loss

    # B = 5 slices, C = 2 classes, p = (0.8, 0.2) everywhere: per-pixel entropy -(0.8 ln 0.8 + 0.2 ln 0.2)
    logits = torch.zeros(5, 2, 4, 4)
    logits[:, 0] = math.log(0.8)
    logits[:, 1] = math.log(0.2)
    h = -(0.8 * math.log(0.8) + 0.2 * math.log(0.2))
    assert float(entropy_loss(logits)) == pytest.approx(h, rel=1e-6)
    assert float(entropy_loss(logits, "released")) == pytest.approx(h * 5 / (2 * math.log(2)), rel=1e-6)  # 3.6 x
    with pytest.raises(ValueError, match="entropy scale must be one of"):
        entropy_loss(logits, "bits")


def test_the_online_schedule_steps_on_each_batch_then_segments_it_with_the_updated_network():
    """The released schedule: under the evaluator's no_grad, each call takes one step and the returned logits
    are those of the network after that step."""
    from fedharmony.methods.iopfl.adaptation import OnlineAdaptation, UnsupervisedLoss, with_schedule

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4, track_running_stats=False),
                              torch.nn.Conv2d(4, 2, 1))
    before = copy.deepcopy(net.state_dict())
    online = with_schedule(net, "online", UnsupervisedLoss(w_cons=0.0, w_shape=0.0), lr=1e-2)
    assert isinstance(online, OnlineAdaptation)
    x = torch.randn(5, 3, 8, 8)
    with torch.no_grad():  # as MONAI's evaluator calls the inferer
        out = online(x)
        assert len(online.history) == 1
        assert not torch.equal(net[0].weight, before["0.weight"])  # it stepped
        torch.testing.assert_close(out, net(x))  # and segmented with the stepped network
        online(x)
    assert len(online.history) == 2
    assert with_schedule(net, "passes", UnsupervisedLoss(), 1e-3) is net
    with pytest.raises(ValueError, match="adaptation schedule must be one of \\('passes', 'online'\\), got 'batch'"):
        with_schedule(net, "batch", UnsupervisedLoss(), 1e-3)
    with pytest.raises(ValueError, match="routing_safe judges the adapted network"):
        with_schedule(net, "online", UnsupervisedLoss(), 1e-3, method="routing_safe")


def test_routed_inference_defaults_to_the_global_model_and_says_why(tiny_sites, tmp_path):
    """No test-time method has passed a planned non-inferiority test against the global model on unseen scanners,
    so the bundle's default is the global model, and its log says so and how to choose another."""
    config = json.loads((BUNDLE / "configs" / "routed_inference.json").read_text())
    assert config["method"] == "global"
    _write_tiny_pool(tmp_path / "pool")
    out = tmp_path / "masks"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file",
           str(BUNDLE / "configs" / "routed_inference.json"), "--bundle_root", str(BUNDLE),
           "--pool_dir", str(tmp_path / "pool"), "--dataset_dir", str(tiny_sites / "BIDMC"), "--output_dir", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    log = res.stdout + res.stderr
    assert res.returncode == 0, log[-2000:]
    assert "test-time method: global (the pool's global model, nothing adapts)" in log
    assert "--method routing (or routing_safe, ...) runs one" in log
    assert len(list(out.glob("*_seg.nii.gz"))) == 3  # every volume of the site segmented
