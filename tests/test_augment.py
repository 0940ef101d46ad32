"""inference.training.augment and the classifier's dataset/selection helpers, on real NIH radiographs."""

from __future__ import annotations

import csv
from dataclasses import fields, replace
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from inference.preprocess import PreprocessParams, apply_clahe, export_image, letterbox, to_model_input
from inference.training import augment as aug
from inference.training.augment import MARKERS, AugmentConfig, geometry_augment, site_augment
from inference.training.data.images import load_image01
from inference.training.data.sample import Sample
from inference.training.metrics import binary_metrics, choose_threshold, roc_auc
from inference.training.train_classifier import (
    ClassifierTrainConfig,
    CXRDataset,
    balanced_weights,
    per_view_threshold,
    worst_view_auc,
)


@pytest.fixture(autouse=True)
def one_torch_thread():
    """One intra-op thread for these tests, whichever module ran before in this process."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)  # the next module's tests in this test process get what they had


SIZE = 64
PROB_FIELDS = [f.name for f in fields(AugmentConfig) if f.name.startswith("p_")]
# (label, view) -> how many images of that cell the dataset tests use (unequal on purpose)
CELLS = {(0, "PA"): 2, (0, "AP"): 1, (1, "PA"): 1, (1, "AP"): 2}


@pytest.fixture(scope="module")
def samples(datasets_dir: Path) -> list[Sample]:
    root = datasets_dir / "nih-matched"
    with open(root / "labels.csv", newline="") as fh:
        rows = sorted(csv.DictReader(fh), key=lambda r: r["path"])
    out = []
    for (label, view), n in CELLS.items():
        picked = [r for r in rows if int(r["label"]) == label and r["view_position"] == view][:n]
        if len(picked) < n:
            pytest.fail(f"{root / 'labels.csv'}: fewer than {n} {view} images with label {label}")
        out += [
            Sample(
                image_id=r["image"],
                path=root / r["path"],
                patient_id=r["patient_id"],
                abnormal=bool(label),
                view=view,
            )
            for r in picked
        ]
    return out


@pytest.fixture(scope="module")
def images(samples) -> dict[str, np.ndarray]:
    """Two normal and two abnormal raw images (float32 [0, 1], 512 x 512)."""
    normal = [s for s in samples if not s.abnormal][:2]
    abnormal = [s for s in samples if s.abnormal][:2]
    return {s.image_id: load_image01(s.path) for s in normal + abnormal}


def _lap_energy(img: np.ndarray) -> float:
    return float((cv2.Laplacian(np.asarray(img, np.float32), cv2.CV_32F) ** 2).mean())


# ---------------------------------------------------------------- primitives


def test_blur_lowers_and_unsharp_raises_laplacian_energy(images):
    for name, img in images.items():
        e = _lap_energy(img)
        b1, b2 = aug.blur(img, 1.0), aug.blur(img, 2.0)
        sh = aug.unsharp(img, 1.0)
        for out in (b1, b2, sh):
            assert out.shape == img.shape and out.dtype == np.float32, name
        assert _lap_energy(b1) < 0.3 * e, name
        assert _lap_energy(b2) < _lap_energy(b1), name  # more blur, less detail
        assert _lap_energy(sh) > 2.0 * e, name
        assert _lap_energy(aug.unsharp(img, 1.5)) > _lap_energy(aug.unsharp(img, 0.3)) > e, name
        assert sh.min() >= 0.0 and sh.max() <= 1.0, name
        assert abs(float(b1.mean()) - float(img.mean())) < 2e-3, name  # blur moves detail, not brightness


def test_jpeg_recompression_changes_pixels_but_not_brightness(images):
    for name, img in images.items():
        q30, q90 = aug.jpeg(img, 30), aug.jpeg(img, 90)
        assert q30.shape == img.shape and q30.dtype == np.float32, name
        assert q30.min() >= 0.0 and q30.max() <= 1.0, name
        np.testing.assert_allclose(q30 * 255, np.rint(q30 * 255), atol=1e-3)  # an 8-bit image again
        d30, d90 = np.abs(q30 - img).mean(), np.abs(q90 - img).mean()
        assert d30 > 3e-3, f"{name}: q30 changed pixels by only {d30:.5f}"
        assert d90 < d30, name  # lower quality, larger error
        assert abs(float(q30.mean()) - float(img.mean())) < 2e-3, name


def test_resample_loses_high_frequencies_only(images):
    for name, img in images.items():
        out = aug.resample(img, 0.5)
        assert out.shape == img.shape and out.dtype == np.float32, name
        assert _lap_energy(out) < 0.3 * _lap_energy(img), name
        assert _lap_energy(aug.resample(img, 0.35)) < _lap_energy(aug.resample(img, 0.8)), name
        # the coarse anatomy is kept
        assert np.abs(aug.blur(out, 4.0) - aug.blur(img, 4.0)).mean() < 5e-3, name
        assert abs(float(out.mean()) - float(img.mean())) < 2e-3, name


def test_window_clips_both_ends_and_stretches_the_rest(images):
    for name, img in images.items():
        out = aug.window(img, 0.05, 0.95)
        assert out.shape == img.shape, name
        assert out.min() == 0.0 and out.max() == 1.0, name
        assert (out == 0).mean() >= 0.04 and (out == 1).mean() >= 0.04, name  # about 5 % clipped each end
        lo, hi = np.quantile(img, [0.05, 0.95])
        inside = (img > lo) & (img < hi)
        np.testing.assert_allclose(out[inside], (img[inside] - lo) / (hi - lo), atol=1e-5, err_msg=name)
        assert out.std() > img.std(), name  # stretched
    flat = np.full((32, 32), 0.4, np.float32)
    np.testing.assert_array_equal(aug.window(flat, 0.05, 0.95), flat)


def test_crop_jitter_returns_a_sub_image_no_smaller_than_keep_min(images):
    img = next(iter(images.values()))
    h, w = img.shape
    index = np.arange(h * w, dtype=np.float64).reshape(h, w)  # each pixel knows where it came from
    shapes = set()
    for seed in range(40):
        out = aug.crop_jitter(img, np.random.default_rng(seed), 0.85)
        where = aug.crop_jitter(index, np.random.default_rng(seed), 0.85)  # same draws, same window
        kh, kw = out.shape
        assert where.shape == out.shape
        assert round(0.85 * h) <= kh <= h and round(0.85 * w) <= kw <= w, (seed, out.shape)
        y, x = divmod(int(where[0, 0]), w)
        np.testing.assert_array_equal(where, index[y : y + kh, x : x + kw])
        np.testing.assert_array_equal(out, img[y : y + kh, x : x + kw])
        shapes.add(out.shape)
    assert len(shapes) > 20  # really random
    assert min(s[0] for s in shapes) < 0.9 * h and min(s[1] for s in shapes) < 0.9 * w


def test_draw_marker_brightens_a_corner_and_leaves_the_centre(images):
    for name, img in list(images.items())[:2]:
        h, w = img.shape
        for seed in range(30):
            out = aug.draw_marker(img, np.random.default_rng(seed))
            assert out.shape == img.shape and out.dtype == np.float32
            changed = out != img
            assert changed.sum() > 20, (name, seed)
            ys, xs = np.nonzero(changed)
            np.testing.assert_array_equal(out[h // 4 : 3 * h // 4], img[h // 4 : 3 * h // 4])  # centre band untouched
            top, bottom = ys.max() < h / 4, ys.min() >= 3 * h / 4
            assert top or bottom, (name, seed, ys.min(), ys.max())  # one marker, in the top or the bottom quarter
            assert min(xs.min() / w, 1 - xs.max() / w) <= 0.21, (name, seed)  # anchored near a side: a corner
            assert out[changed].max() >= 0.84, (name, seed)  # bright, as lead markers are
            dark = changed & (img < 0.8)
            assert (out[dark] > img[dark]).all(), (name, seed)  # never darkens dark film
            assert out.min() >= 0.0 and out.max() <= 1.0
    assert "AP PORTABLE" in MARKERS and "L" in MARKERS and "R" in MARKERS


# ---------------------------------------------------------------- site_augment / geometry_augment


def test_site_augment_range_and_seeding(images):
    cfg = AugmentConfig()
    img = next(iter(images.values()))
    before = img.copy()
    outs = []
    for seed in range(6):
        a = site_augment(img, np.random.default_rng(seed), cfg)
        b = site_augment(img, np.random.default_rng(seed), cfg)
        assert a.dtype == np.float32 and a.ndim == 2 and a.flags.c_contiguous
        assert a.min() >= 0.0 and a.max() <= 1.0
        assert a.shape[0] >= round(cfg.crop_min * img.shape[0]) and a.shape[1] >= round(cfg.crop_min * img.shape[1])
        np.testing.assert_array_equal(a, b)  # same seed, same image
        outs.append(a)
    for i in range(len(outs)):
        for j in range(i + 1, len(outs)):
            assert outs[i].shape != outs[j].shape or not np.array_equal(outs[i], outs[j]), (i, j)
    assert any(not np.array_equal(o, img) for o in outs)
    np.testing.assert_array_equal(img, before)  # the caller's (cached) image is not modified


def test_augment_config_none_changes_nothing(images):
    none = AugmentConfig.none()
    assert all(getattr(none, p) == 0.0 for p in PROB_FIELDS)
    for name, img in images.items():
        out = site_augment(img, np.random.default_rng(0), none)
        assert out.dtype == np.float32
        np.testing.assert_array_equal(out, img, err_msg=name)
        boxed, _ = letterbox(img, SIZE)
        np.testing.assert_array_equal(geometry_augment(boxed, np.random.default_rng(0), none, 0.3), boxed)


@pytest.mark.parametrize("field", PROB_FIELDS)
def test_every_augmentation_is_reachable(images, field):
    cfg = replace(AugmentConfig.none(), **{field: 1.0})
    img = next(iter(images.values()))
    for seed in range(3):
        out = site_augment(img, np.random.default_rng(seed), cfg)
        assert out.dtype == np.float32 and out.min() >= 0.0 and out.max() <= 1.0
        if field == "p_crop":
            assert out.shape != img.shape and out.shape[0] <= img.shape[0] and out.shape[1] <= img.shape[1]
        else:
            assert out.shape == img.shape, field
            assert np.abs(out - img).mean() > 1e-5, f"{field}=1 left the image unchanged (seed {seed})"


def test_geometry_augment_keeps_shape_and_pads_with_pad_value(images):
    pad = 114.0 / 255.0
    img = next(iter(images.values()))
    boxed, _ = letterbox(img, SIZE, pad)
    shrink = replace(AugmentConfig.none(), scale=(0.8, 0.8))
    out = geometry_augment(boxed, np.random.default_rng(0), shrink, pad)
    assert out.shape == boxed.shape and out.dtype == np.float32
    ring = np.ones_like(out, bool)
    ring[6:-6, 6:-6] = False  # the image now spans 6.4 ... 57.6 px
    np.testing.assert_allclose(out[ring], pad, atol=1e-6)
    assert np.abs(out[12:-12, 12:-12] - pad).mean() > 0.05  # the image is still there

    rotate = replace(AugmentConfig.none(), rotation_deg=10.0, scale=(1.0, 1.0))
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    inscribed = (yy - (SIZE - 1) / 2) ** 2 + (xx - (SIZE - 1) / 2) ** 2 < (SIZE / 2 - 2) ** 2
    filled = []
    for seed in range(5):
        out = geometry_augment(boxed, np.random.default_rng(seed), rotate, 0.9)
        assert out.shape == boxed.shape and not np.array_equal(out, boxed)
        padded = np.isclose(out, 0.9, atol=1e-6)
        assert not (padded & inscribed).any()  # a rotation about the centre keeps the inscribed disc covered
        filled.append(int(padded.sum()))
    assert max(filled) > 20  # the corners a rotation uncovers get pad_value

    shift = replace(AugmentConfig.none(), translate=0.1)
    out = geometry_augment(boxed, np.random.default_rng(1), shift, 0.9)
    assert out.shape == boxed.shape and not np.array_equal(out, boxed)
    full = geometry_augment(boxed, np.random.default_rng(1), ClassifierTrainConfig().augment_config(), pad)
    np.testing.assert_array_equal(
        full, geometry_augment(boxed, np.random.default_rng(1), ClassifierTrainConfig().augment_config(), pad)
    )


# ---------------------------------------------------------------- classifier training helpers


def test_train_config_augment_modes():
    site = ClassifierTrainConfig(rotation_deg=7.0).augment_config()
    assert site.rotation_deg == 7.0 and site.scale == (0.9, 1.1) and site.translate == 0.06
    assert all(getattr(site, p) == getattr(AugmentConfig(), p) > 0 for p in PROB_FIELDS)
    geo = ClassifierTrainConfig(augment="geometry").augment_config()
    assert all(getattr(geo, p) == 0.0 for p in PROB_FIELDS) and geo.rotation_deg == 10.0
    assert ClassifierTrainConfig(augment="none").augment_config() == AugmentConfig.none()
    assert ClassifierTrainConfig().augment == "site" and ClassifierTrainConfig().intensity == "rank"


def _params():
    return PreprocessParams.for_classifier(SIZE, intensity="rank")


def test_dataset_augmented_items_are_seeded_by_epoch_and_index(samples):
    cfg = ClassifierTrainConfig(input_size=SIZE)
    ds = CXRDataset(samples, _params(), cfg, augment=True)
    assert len(ds) == len(samples)
    first = [ds[i] for i in range(len(ds))]
    for i, (x, y) in enumerate(first):
        assert x.shape == (1, SIZE, SIZE) and x.dtype == torch.float32
        assert float(y) == samples[i].label
        assert x.min() >= -2.0 - 1e-6 and x.max() <= 2.0 + 1e-6  # (x - 0.5) / 0.25 with x in [0, 1]
        assert torch.equal(ds[i][0], x)  # same epoch and index: same tensor
    assert not torch.equal(first[0][0], first[1][0])
    ds.epoch = 1
    for i in range(len(ds)):
        assert not torch.equal(ds[i][0], first[i][0]), f"item {i}: epoch 1 gave the epoch 0 tensor"
    ds.epoch = 0
    assert torch.equal(ds[2][0], first[2][0])  # back to epoch 0 (a resumed run sees the same images)
    other = CXRDataset(samples[:3], _params(), ClassifierTrainConfig(input_size=SIZE, seed=1), augment=True)
    assert not torch.equal(other[0][0], first[0][0])


def test_dataset_without_augmentation_is_the_inference_input(samples):
    params = _params()
    ds = CXRDataset(samples, params, ClassifierTrainConfig(input_size=SIZE), augment=False)
    tol = 0.5 / 255 / params.std + 1e-5  # the dataset caches the CLAHE'd, letterboxed image as uint8
    for i, s in enumerate(samples):
        x, y = ds[i]
        ref, _ = to_model_input(apply_clahe(load_image01(s.path), params), params)
        assert x.shape == (1, SIZE, SIZE) and float(y) == s.label
        assert np.abs(x.numpy() - ref).max() <= tol, s.image_id
        ds.epoch = 3
        assert torch.equal(ds[i][0], x)  # no augmentation: the epoch does not matter
        ds.epoch = 0
    # the rank normalisation really is part of the path: "none" gives another input
    plain = PreprocessParams.for_classifier(SIZE)
    ref_none, _ = to_model_input(apply_clahe(load_image01(samples[0].path), plain), plain)
    assert np.abs(ds[0][0].numpy() - ref_none).mean() > 0.05


def test_augmented_path_without_augmentations_is_the_inference_path(samples):
    params = _params()
    cfg = ClassifierTrainConfig(input_size=SIZE, augment="none")
    train = CXRDataset(samples[:3], params, cfg, augment=True)
    val = CXRDataset(samples[:3], params, cfg, augment=False)
    for i in range(3):
        assert np.abs(train[i][0].numpy() - val[i][0].numpy()).max() <= 0.5 / 255 / params.std + 1e-5


def test_files_exported_clahed_are_not_clahed_again(samples, tmp_path):
    """Samples with clahe_applied (written by export_image) go through letterbox/normalise only; with
    augmentation they get the geometry stage but no site augmentation (which belongs before CLAHE)."""
    params = _params()
    exported = []
    for s in samples[:2]:
        path = tmp_path / f"{s.image_id}.png"
        cv2.imwrite(str(path), export_image(load_image01(s.path), params))
        exported.append(replace(s, path=path, clahe_applied=True))
    cfg = ClassifierTrainConfig(input_size=SIZE)
    val = CXRDataset(exported, params, cfg, augment=False)
    geo_cfg = ClassifierTrainConfig(input_size=SIZE, augment="geometry")
    train_geo = CXRDataset(exported, params, geo_cfg, augment=True)
    for i, s in enumerate(exported):
        ref, _ = to_model_input(load_image01(s.path), params)
        assert np.abs(val[i][0].numpy() - ref).max() <= 0.5 / 255 / params.std + 1e-5
        clahe_twice, _ = to_model_input(apply_clahe(load_image01(s.path), params), params)
        assert np.abs(val[i][0].numpy() - clahe_twice).mean() > 0.05
        x = train_geo[i][0].numpy()
        assert x.shape == (1, SIZE, SIZE) and not np.array_equal(x, val[i][0].numpy())
        # geometry only, seeded by (seed, epoch, index): no site augmentation, no second CLAHE
        boxed, _ = letterbox(load_image01(s.path), SIZE, params.pad_value)
        rng = np.random.default_rng((geo_cfg.seed, 0, i))
        moved = geometry_augment(np.rint(boxed * 255) / 255, rng, geo_cfg.augment_config(), params.pad_value)
        np.testing.assert_allclose(x[0], (moved - params.mean) / params.std, atol=1e-5)


def _mk(view, label, i=0):
    return Sample(
        image_id=f"{view}{label}_{i}",
        path=Path(f"/nonexistent/{view}{label}_{i}.png"),
        patient_id=f"p{view}{label}{i}",
        abnormal=bool(label),
        view=view,
    )


def test_balanced_weights_give_every_view_label_cell_the_same_share(samples):
    counts = {("AP", 0): 5, ("AP", 1): 1, ("PA", 0): 2, ("PA", 1): 7, (None, 1): 3}
    synthetic = [_mk(v, lab, i) for (v, lab), n in counts.items() for i in range(n)]
    for group in (synthetic, samples):
        w = balanced_weights(group)
        assert w.shape == (len(group),) and (w > 0).all()
        totals = {}
        for s, wi in zip(group, w):
            key = (s.view or "unknown", s.label)
            totals[key] = totals.get(key, 0.0) + wi
        assert len(totals) == len({(s.view or "unknown", s.label) for s in group})
        np.testing.assert_allclose(list(totals.values()), next(iter(totals.values())), rtol=1e-12)
    w = balanced_weights(synthetic)
    assert w[0] == pytest.approx(w[-1] * 3 / 5)  # an AP normal (cell of 5) vs an unknown-view abnormal (cell of 3)


def test_worst_view_auc_is_the_lowest_per_view_auc():
    rng = np.random.default_rng(1)
    group, probs = [], []
    for view, gap, n in (("AP", 0.6, 12), ("PA", 0.1, 12), ("LL", -0.8, 3)):
        for label in (0, 1):
            for i in range(n):
                group.append(_mk(view, label, i))
                probs.append(0.3 + gap * label + 0.1 * rng.standard_normal())
    probs = np.asarray(probs)

    def auc_of(view):
        idx = [i for i, s in enumerate(group) if s.view == view]
        return roc_auc([group[i].label for i in idx], probs[idx])

    assert auc_of("AP") > auc_of("PA") > auc_of("LL")
    # LL has 3 images per class: too few to count (its AUC is noise), so PA is the worst view
    assert worst_view_auc(group, probs) == pytest.approx(auc_of("PA"))
    # no view holds 10 images of each class: the overall AUC
    small = [i for i, s in enumerate(group) if s.view == "LL"]
    assert worst_view_auc([group[i] for i in small], probs[small]) == pytest.approx(auc_of("LL"))


def test_per_view_threshold_reaches_the_target_sensitivity_in_every_view():
    rng = np.random.default_rng(0)
    group, probs = [], []
    for view, shift in (("AP", 0.25), ("PA", -0.15)):  # AP positives score high, PA positives low
        for i in range(40):
            group.append(_mk(view, 1, i))
            probs.append(np.clip(0.6 + shift + 0.15 * rng.standard_normal(), 0, 1))
        for i in range(40):
            group.append(_mk(view, 0, i))
            probs.append(np.clip(0.35 + 0.15 * rng.standard_normal(), 0, 1))
    probs = np.asarray(probs)
    for target in (0.8, 0.9, 0.95):
        thr = per_view_threshold(group, probs, target)
        for view in ("AP", "PA"):
            idx = [i for i, s in enumerate(group) if s.view == view]
            m = binary_metrics([group[i].label for i in idx], probs[idx], thr)
            assert m["sensitivity"] >= target, (target, view, m["sensitivity"])
        # the pooled threshold misses the target on PA: per view matters
        pooled = choose_threshold([s.label for s in group], probs, "sensitivity", target)
        pa = [i for i, s in enumerate(group) if s.view == "PA"]
        assert binary_metrics([group[i].label for i in pa], probs[pa], pooled)["sensitivity"] < target
        assert thr < pooled
