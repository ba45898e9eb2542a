"""Scans as hospitals store them: one geometry whatever the storage, and a folder run that skips and names bad inputs.

Unit level: MONAI's own transforms and evaluator with a one-layer network; the bundles' inference
configs run end to end through ``python -m monai.bundle run`` in tests/test_bundle_inference.py.
"""

import gzip
import json

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.transforms import Compose, EnsureChannelFirstd, EnsureTyped, Invertd, LoadImaged

from fedharmony.bundle.folder_inference import (SKIPPED, FolderEvaluator, InferenceSummary, InputRejected, SaveMaskd,
                                                ScreenedDataset, screened_collate)
from fedharmony.bundle.inferers import Slab25DInferer
from fedharmony.bundle.transforms import SelectVolumed, VolumeGeometryd

RAS_AFFINE = np.array([[0.8, 0, 0, -16.0], [0, 0.6, 0, -12.0], [0, 0, 3.0, -10.0], [0, 0, 0, 1]])


def stored_as(volume, affine, storage):
    """The same scan stored another way: (array, affine) with identical world coordinates."""
    shape = np.array(volume.shape)
    if storage == "RAS":
        return volume, affine
    if storage in ("LPS", "LAS"):
        axes = (0, 1) if storage == "LPS" else (0,)
        flip = np.eye(4)
        for a in axes:
            flip[a, a], flip[a, 3] = -1, shape[a] - 1  # new index i' = n - 1 - i
        return np.flip(volume, axis=axes).copy(), affine @ flip
    if storage == "permuted":  # axes stored (y, x, z)
        perm = np.eye(4)[[1, 0, 2, 3]]
        return volume.transpose(1, 0, 2).copy(), affine @ perm
    raise ValueError(storage)


@pytest.fixture()
def scan(tmp_path):
    rng = np.random.default_rng(0)
    return rng.random((40, 30, 7)).astype(np.float32)


def preprocessing(pixdim, image_size):
    return Compose([LoadImaged("image", image_only=True), EnsureChannelFirstd("image"), SelectVolumed("image"),
                    VolumeGeometryd("image", pixdim=pixdim, image_size=image_size),
                    EnsureTyped("image", dtype=torch.float32)])


@pytest.mark.parametrize("pixdim,image_size", [(0.0, -1), (1.0, 32), (0.0, 32)])
@pytest.mark.parametrize("storage", ["LPS", "LAS", "permuted"])
def test_flipped_or_permuted_storage_reaches_the_network_as_the_ras_scan_and_inverts_to_its_own_grid(
        tmp_path, scan, storage, pixdim, image_size):
    for name, (arr, aff) in {"ras": (scan, RAS_AFFINE), "other": stored_as(scan, RAS_AFFINE, storage)}.items():
        nib.save(nib.Nifti1Image(arr, aff), tmp_path / f"{name}.nii.gz")
    pre = preprocessing(pixdim, image_size)
    ras, other = (pre({"image": str(tmp_path / f"{n}.nii.gz")}) for n in ("ras", "other"))
    torch.testing.assert_close(other["image"].as_tensor(), ras["image"].as_tensor())
    if image_size > 0:
        assert tuple(ras["image"].shape[1:3]) == (image_size, image_size)

    # a prediction made on the common grid goes back to each file's own grid, shape and affine
    inverted = {}
    for name, item in (("ras", ras), ("other", other)):
        item["pred"] = (item["image"] > 0.5).float()
        inverted[name] = Invertd("pred", transform=pre, orig_keys="image", nearest_interp=True)(item)["pred"]
        stored = nib.load(tmp_path / f"{name}.nii.gz")
        assert tuple(inverted[name].shape[1:]) == stored.shape
        np.testing.assert_allclose(inverted[name].affine.numpy(), stored.affine, atol=1e-5)
    # ... and says the same thing in world space: other's mask read back through its affine equals ras's
    back_in_ras, _ = stored_as(inverted["other"][0].numpy(), RAS_AFFINE, "RAS")
    expected = {"LPS": inverted["ras"][0].numpy()[::-1, ::-1], "LAS": inverted["ras"][0].numpy()[::-1],
                "permuted": inverted["ras"][0].numpy().transpose(1, 0, 2)}[storage]
    np.testing.assert_array_equal(back_in_ras, expected)


def test_spacing_normalization_gives_every_scan_the_target_in_plane_spacing_and_keeps_slices(tmp_path, scan):
    nib.save(nib.Nifti1Image(scan, RAS_AFFINE), tmp_path / "a.nii.gz")
    out = preprocessing(1.2, -1)({"image": str(tmp_path / "a.nii.gz")})["image"]
    spacing = np.sqrt((out.affine.numpy()[:3, :3] ** 2).sum(axis=0))
    np.testing.assert_allclose(spacing, [1.2, 1.2, 3.0], atol=1e-6)
    assert out.shape[-1] == scan.shape[-1]  # slices untouched


def test_geometry_refuses_sizes_the_network_cannot_take_and_nonsense_spacing():
    with pytest.raises(ValueError, match="image_size 100 must be a multiple of 16.*e.g. 112"):
        VolumeGeometryd("image", image_size=100)
    with pytest.raises(ValueError, match="pixdim must be an in-plane spacing in mm"):
        VolumeGeometryd("image", pixdim=float("nan"))


def test_a_4d_series_is_refused_by_name_unless_a_volume_is_picked(tmp_path, scan):
    series = np.stack([scan, scan * 2, scan * 3], axis=-1)
    nib.save(nib.Nifti1Image(series, RAS_AFFINE), tmp_path / "dwi.nii.gz")
    load = Compose([LoadImaged("image", image_only=True), EnsureChannelFirstd("image")])
    item = load({"image": str(tmp_path / "dwi.nii.gz")})
    with pytest.raises(InputRejected, match=r"dwi.nii.gz holds 3 volumes \(a 4-D series.*set volume_index.*0 to 2"):
        SelectVolumed("image")(item)
    picked = SelectVolumed("image", index=1)(item)["image"]
    assert tuple(picked.shape) == (1, *scan.shape)
    torch.testing.assert_close(picked[0].as_tensor(), torch.from_numpy(scan * 2))
    with pytest.raises(InputRejected, match="volume_index=5 is not one of them"):
        SelectVolumed("image", index=5)(item)


def write_mixed_folder(folder, scan):
    """good volumes (RAS and LPS), a 4-D series, a tiny volume, a truncated .nii.gz, a text file."""
    folder.mkdir()
    nib.save(nib.Nifti1Image(scan, RAS_AFFINE), folder / "good_ras.nii.gz")
    nib.save(nib.Nifti1Image(*stored_as(scan, RAS_AFFINE, "LPS")), folder / "good_lps.nii.gz")
    nib.save(nib.Nifti1Image(np.stack([scan, scan], -1), RAS_AFFINE), folder / "series4d.nii.gz")
    nib.save(nib.Nifti1Image(scan[:4, :5], RAS_AFFINE), folder / "tiny.nii.gz")
    (folder / "corrupt.nii.gz").write_bytes(gzip.compress(b"\x5c\x01" + b"\0" * 400)[:60])
    (folder / "notes.txt").write_text("scanner log\n")
    return sorted(str(p) for p in folder.glob("*.nii.gz"))


class Threshold(torch.nn.Module):
    """2.5D stand-in network: (B, 3, H, W) -> (B, 2, H, W) logits of 'centre slice > 0.5'; batch norm like the real one."""

    def __init__(self):
        super().__init__()
        self.norm = torch.nn.BatchNorm2d(3)

    def forward(self, x):
        centre = x[:, 1:2] - 0.5
        return torch.cat([-centre, centre], dim=1)


def run_folder(folder, out, pixdim=0.0, image_size=-1, overwrite=False, allow_skipped=False):
    from monai.data import DataLoader
    from monai.transforms import AsDiscreted

    inputs = [{"image": p} for p in sorted(str(q) for q in folder.glob("*.nii.gz"))]
    unusable = [{"input": str(folder / "notes.txt"), "reason": "not an image"}]
    summary = InferenceSummary(str(folder), str(out), unusable=unusable, allow_skipped=allow_skipped)
    pre = preprocessing(pixdim, image_size)
    post = Compose([AsDiscreted("pred", argmax=True),
                    Invertd("pred", transform=pre, orig_keys="image", nearest_interp=True),
                    SaveMaskd("pred", output_dir=str(out), overwrite=overwrite, summary=summary)])
    loader = DataLoader(ScreenedDataset(inputs, pre), batch_size=1, collate_fn=screened_collate)
    evaluator = FolderEvaluator(device=torch.device("cpu"), val_data_loader=loader, network=Threshold().eval(),
                                inferer=Slab25DInferer(slices_per_batch=4, min_size=16), postprocessing=post,
                                summary=summary)
    evaluator.run()
    return summary


def test_a_mixed_folder_gives_masks_for_the_good_scans_and_names_every_other_input(tmp_path, scan):
    folder = tmp_path / "in"
    write_mixed_folder(folder, scan)
    out = tmp_path / "out"
    summary = run_folder(folder, out)
    assert sorted(p.name for p in out.glob("*.nii.gz")) == ["good_lps_seg.nii.gz", "good_ras_seg.nii.gz"]
    reasons = {p["input"].rsplit("/", 1)[-1]: p["reason"] for p in summary.skipped}
    assert set(reasons) == {"notes.txt", "series4d.nii.gz", "tiny.nii.gz", "corrupt.nii.gz"}
    assert "holds 2 volumes" in reasons["series4d.nii.gz"] and "volume_index" in reasons["series4d.nii.gz"]
    assert "tiny.nii.gz" in reasons["tiny.nii.gz"] and "at least 16 x 16" in reasons["tiny.nii.gz"]
    for name in ("good_ras", "good_lps"):  # each mask on its own input's grid: shape and affine
        mask, stored = nib.load(out / f"{name}_seg.nii.gz"), nib.load(folder / f"{name}.nii.gz")
        assert mask.shape == stored.shape and mask.get_data_dtype() == np.uint8
        np.testing.assert_allclose(mask.affine, stored.affine, atol=1e-5)
        np.testing.assert_array_equal(np.asarray(mask.dataobj) if name == "good_ras" else
                                      np.asarray(mask.dataobj)[::-1, ::-1], (scan > 0.5).astype(np.uint8))

    with pytest.raises(SystemExit) as stop:  # something was skipped: exit status 1, summary written first
        summary.finish()
    assert stop.value.code == 1
    written = json.loads((out / "inference_summary.json").read_text())
    assert written["processed"] == 2 and written["skipped"] == 4
    assert {len(rec["outputs"]) for rec in written["inputs"]} == {1}
    assert all(rec["seconds"] > 0 for rec in written["inputs"])  # per input, loading to saving
    assert run_folder(folder, tmp_path / "out2", allow_skipped=True).finish()["skipped"] == 4  # no exit


def test_existing_masks_are_kept_unless_overwrite_and_nothing_half_written_is_left(tmp_path, scan):
    folder = tmp_path / "in"
    folder.mkdir()
    nib.save(nib.Nifti1Image(scan, RAS_AFFINE), folder / "a.nii.gz")
    (folder / "notes.txt").write_text("")
    out = tmp_path / "out"
    out.mkdir()
    (out / "a_seg.nii.gz").write_bytes(b"a mask from last week")
    summary = run_folder(folder, out)
    assert (out / "a_seg.nii.gz").read_bytes() == b"a mask from last week"
    assert any("a_seg.nii.gz already exists" in s["reason"] and "overwrite" in s["reason"] for s in summary.skipped)
    run_folder(folder, out, overwrite=True)
    assert nib.load(out / "a_seg.nii.gz").shape == scan.shape
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []  # no temporary files left


def test_screened_dataset_turns_a_failing_item_into_a_record_and_collate_keeps_the_good_ones(tmp_path, scan):
    nib.save(nib.Nifti1Image(scan, RAS_AFFINE), tmp_path / "ok.nii.gz")
    (tmp_path / "bad.nii.gz").write_bytes(b"not gzip at all")
    ds = ScreenedDataset([{"image": str(tmp_path / "ok.nii.gz")}, {"image": str(tmp_path / "bad.nii.gz")}],
                         preprocessing(0.0, -1))
    bad = ds[1]
    assert list(bad) == [SKIPPED] and bad[SKIPPED][0]["input"].endswith("bad.nii.gz")
    batch = screened_collate([ds[0], bad])
    assert batch["image"].shape[0] == 1 and len(batch[SKIPPED]) == 1
    assert screened_collate([bad]) == {SKIPPED: bad[SKIPPED]}
