"""inference.preprocess intensity normalisation (``intensity="rank"``) on real NIH radiographs.

``normalise_intensity`` is exact histogram equalisation: pixels are ordered by grey level, ties broken by
their 3 x 3 local mean, and pixels equal in both share their mid-rank. The claims under test:

* the output is the mid-rank of each pixel in that order, so it is (nearly) uniform on [0, 1], keeps the
  order of grey levels, and keeps flat areas flat;
* a monotone change of the grey scale (gamma, brightness/contrast, a VOI window, the bit depth an archive
  stores) keeps every pixel inside the rank interval of its grey level and the mean rank of every level
  exactly. Within a level the tie-break (local mean) is re-ordered by a nonlinear change (gamma, the
  clipped tails of a window) and by quantisation of the local mean under a linear one, so the output is
  nearly, not exactly, the same; the old path (``intensity="none"``) sees every such change markedly.

Bounds below are set from measurements on the six test images (numbers in the comments).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from inference.preprocess import RANK_LEVELS, PreprocessParams, apply_clahe, normalise_intensity
from inference.training.data.images import load_image01

RANK = PreprocessParams(intensity="rank")
NONE = PreprocessParams()
N_PER_CLASS = 3


@pytest.fixture(scope="module")
def images(datasets_dir: Path) -> dict[str, np.ndarray]:
    root = datasets_dir / "nih-matched"
    files = []
    for cls in ("normal", "abnormal"):
        found = sorted((root / cls / "images").glob("*.jpg"))[:N_PER_CLASS]
        if len(found) < N_PER_CLASS:
            pytest.fail(f"{root / cls / 'images'} holds fewer than {N_PER_CLASS} images")
        files += found
    return {f.name: load_image01(f) for f in files}


def _quantise(x: np.ndarray, levels: int) -> np.ndarray:
    return (np.rint(x * (levels - 1)) / (levels - 1)).astype(np.float32)


def _voi_window(img: np.ndarray) -> np.ndarray:
    """A linear VOI window mapping [p1, p99] to [0, 1], clipped outside."""
    p1, p99 = np.quantile(img, [0.01, 0.99])
    return np.clip((img - p1) / (p99 - p1), 0.0, 1.0).astype(np.float32)


# Monotone, level-preserving re-mappings of the grey scale an archive or modality may apply.
PERTURBATIONS = {
    "gamma 0.7": lambda x: x**0.7,
    "gamma 1.4": lambda x: x**1.4,
    "brightness/contrast": lambda x: 0.1 + 0.6 * x,
    "brightness/contrast 2": lambda x: 0.3 + 0.5 * x,
    # 12-bit counts in a 16-bit container (a DICOM/PNG read as raw / 65535): the image fills 1/16 of the range
    "12-bit in 16-bit container": lambda x: np.rint(x * 4095) / 65535,
}


# Those that keep the local mean up to quantisation (linear on the image's grey levels): the tie-break
# order changes only where two local means round to the same level, so the output hardly moves.
LINEAR = {"brightness/contrast", "brightness/contrast 2", "12-bit in 16-bit container"}


def _perturbed(img: np.ndarray, name: str) -> np.ndarray:
    out = np.asarray(PERTURBATIONS[name](img), dtype=np.float32)
    assert out.shape == img.shape and not np.array_equal(out, img)
    return out


def _levels(img: np.ndarray) -> np.ndarray:
    """The grey level (of RANK_LEVELS) each pixel is ranked by, as ``normalise_intensity`` computes it."""
    return np.rint(img * (RANK_LEVELS - 1)).astype(np.int64)


def _level_share(img: np.ndarray) -> np.ndarray:
    """Per pixel: the fraction of the image's pixels on its grey level (the width of its rank interval)."""
    _, inv, counts = np.unique(_levels(img).ravel(), return_inverse=True, return_counts=True)
    return (counts / img.size)[inv].reshape(img.shape)


def _level_mean_rank(img: np.ndarray, out: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Mean of ``out`` over the pixels of each grey level of ``img`` (within ``mask``), levels ascending."""
    sel = np.ones(img.shape, bool) if mask is None else mask
    _, inv = np.unique(_levels(img)[sel], return_inverse=True)
    return np.bincount(inv, weights=out[sel].astype(np.float64)) / np.bincount(inv)


def _plain_mid_rank(img: np.ndarray) -> np.ndarray:
    """Per grey level, ascending: (pixels below + half the pixels on it) / all, plain histogram equalisation."""
    _, counts = np.unique(_levels(img), return_counts=True)
    return (np.cumsum(counts) - counts / 2.0) / img.size


@pytest.mark.parametrize("name", sorted(PERTURBATIONS))
def test_rank_normalisation_is_invariant_to_monotone_grey_scale_changes(images, name):
    """Measured, worst of six images (|normalise_intensity(changed) - normalise_intensity(img)|):
    brightness/contrast max 0.0010 / mean 6.7e-7, brightness/contrast 2: 0.0016 / 1.2e-6, 12-bit in
    16-bit container: 0.0010 / 7.4e-6; gamma 0.7 and 1.4: max 0.145 (a flat border holding 15 % of one
    image on a single level, re-ordered inside it), 0.011-0.024 elsewhere, mean 2.1e-4. apply_clahe(rank)
    mean change at most 0.0009 (gamma), 0.0001 (linear); apply_clahe(none) moves by 0.037 or more."""
    for fname, img in images.items():
        changed = _perturbed(img, name)
        r0, r1 = normalise_intensity(img), normalise_intensity(changed)
        diff = np.abs(r1 - r0)
        # the grey levels keep their order, so every pixel stays inside its level's rank interval ...
        excess = (diff - _level_share(img)).max()
        assert excess <= 1e-6, f"{fname}: {name} moved a pixel {excess:.5f} beyond its grey level's share"
        # ... and each level's mean rank is exactly its plain mid-rank, before and after
        np.testing.assert_allclose(_level_mean_rank(img, r1), _level_mean_rank(img, r0), rtol=0, atol=1e-6)
        np.testing.assert_allclose(_level_mean_rank(img, r0), _plain_mid_rank(img), rtol=0, atol=1e-6)
        # only the tie-break inside a level moves, and little on average
        assert diff.mean() < 1e-3, f"{fname}: {name} moved the rank-normalised image by a mean {diff.mean():.2e}"
        if name in LINEAR:
            assert diff.max() < 0.005, f"{fname}: {name} moved the rank-normalised image by {diff.max():.4f}"
            assert diff.mean() < 3e-5, f"{fname}: {name} moved the rank-normalised image by a mean {diff.mean():.2e}"
        clahe_diff = np.abs(apply_clahe(changed, RANK) - apply_clahe(img, RANK))
        assert clahe_diff.mean() < 2e-3, f"{fname}: {name} moved apply_clahe(rank) by {clahe_diff.mean():.4f}"


@pytest.mark.parametrize("name", sorted(PERTURBATIONS))
def test_without_rank_the_same_changes_move_the_clahe_output(images, name):
    """The control: the perturbations are large enough that a no-op normalisation would be caught."""
    for fname, img in images.items():
        changed = _perturbed(img, name)
        diff = np.abs(apply_clahe(changed, NONE) - apply_clahe(img, NONE)).mean()
        assert diff > 0.025, f"{fname}: {name} changed apply_clahe(none) by only {diff:.4f}"


def test_voi_window_keeps_the_rank_of_every_unclipped_pixel(images):
    """Measured: unclipped pixels move by at most 0.003-0.019 (inside their level's share), mean <= 1.1e-5;
    apply_clahe(rank) by a mean 0.0005-0.0017, apply_clahe(none) by 0.016-0.13."""
    for fname, img in images.items():
        win = _voi_window(img)
        inside = (win > 0) & (win < 1)
        assert 0.01 < 1 - inside.mean() < 0.2  # the window really clips a few per cent
        r0, r1 = normalise_intensity(img), normalise_intensity(win)
        diff = np.abs(r1 - r0)
        # clipping merges the tails but leaves the pixels below/above every unclipped level where they were;
        # the tie-break (local mean) changes near clipped pixels, within the level
        excess = (diff - _level_share(img))[inside].max()
        assert excess <= 1e-6, f"{fname}: an unclipped pixel moved {excess:.5f} beyond its grey level's share"
        np.testing.assert_allclose(
            _level_mean_rank(img, r1, inside), _level_mean_rank(img, r0, inside), rtol=0, atol=1e-6, err_msg=fname
        )
        assert diff[inside].mean() < 1e-4, f"{fname}: unclipped pixels moved by {diff[inside].mean():.2e} on average"
        # CLAHE sees the (merged) clipped tails too, so compare its output on average
        rank_diff = np.abs(apply_clahe(win, RANK) - apply_clahe(img, RANK)).mean()
        none_diff = np.abs(apply_clahe(win, NONE) - apply_clahe(img, NONE)).mean()
        assert rank_diff < 0.005, f"{fname}: the VOI window moved apply_clahe(rank) by {rank_diff:.4f}"
        assert none_diff > 0.01, f"{fname}: the VOI window moved apply_clahe(none) by only {none_diff:.4f}"
        assert none_diff > 3 * rank_diff


def _deeper(img: np.ndarray, seed: int = 0) -> np.ndarray:
    """A higher-bit-depth image whose 8-bit quantisation is (all but a handful of pixels) the stored one."""
    rng = np.random.default_rng(seed)
    x = np.clip(img + rng.uniform(-0.5, 0.5, img.shape).astype(np.float32) / 255, 0.0, 1.0)
    assert (_quantise(x, 256) == img).mean() > 0.999
    return x


@pytest.mark.parametrize("levels", [4096, 65536])
def test_rank_of_12_and_16_bit_storage_matches_8_bit_up_to_the_merged_levels(images, levels):
    """8-bit storage merges levels; a pixel's rank stays inside its 8-bit level's rank interval, so it can move
    at most by the share of that level (the finer levels and the local-mean tie-break order the pixels
    differently inside it). Measured: mean change 0.0017-0.0075, at most 0.002 beyond the share (4096 levels:
    a few pixels round to a neighbouring 8-bit level), none at 65536."""
    for fname, img in images.items():
        x = _deeper(img)
        r8 = normalise_intensity(_quantise(x, 256))
        rk = normalise_intensity(_quantise(x, levels))
        lv = np.rint(_quantise(x, 256) * 255).astype(np.int64)
        share = np.bincount(lv.ravel(), minlength=256)[lv] / lv.size
        diff = np.abs(rk - r8)
        assert diff.mean() < 0.01, f"{fname}: {levels} levels vs 8 bit: mean rank change {diff.mean():.4f}"
        assert (diff <= share + 0.004).all(), f"{fname}: a rank moved by more than its 8-bit level's share"


@pytest.mark.xfail(
    strict=True,
    reason="the local-mean tie-break fills the comb histogram plain rank equalisation leaves on an 8-bit image "
    "(plain: mean 0.017-0.047 on all six images), and 5 of 6 images now differ by a mean 0.005-0.008; but "
    "00000317_003.jpg keeps 0.036: 15 % of it is a flat border on one grey level, which stays one flat "
    "group at 8 bits while the dithered 12/16-bit copy spreads it over a rank interval, and CLAHE sees the "
    "spike and the spread differently (intensity='none': 0.0003)",
)
def test_clahe_after_rank_is_invariant_to_storage_bit_depth(images):
    worst = {}
    for fname, img in images.items():
        x = _deeper(img)
        base = apply_clahe(_quantise(x, 256), RANK)
        worst[fname] = max(np.abs(apply_clahe(_quantise(x, lv), RANK) - base).mean() for lv in (4096, 65536))
    assert max(worst.values()) < 0.01, f"mean |apply_clahe(rank)| change, 12/16 bit vs 8 bit: {worst}"


def test_rank_is_exact_histogram_equalisation_by_mid_rank():
    img = np.array([[0.0, 0.0], [0.5, 1.0]], dtype=np.float32)
    # 3 x 3 local means with BORDER_REFLECT (edge pixel repeated): weights [[4, 2], [2, 1]] / 9 seen from the
    # top-left pixel, and mirrored for the others -> 2/9, 2.5/9 (level 0), 4/9 (0.5), 5/9 (1.0).
    # Level 0 is split by the local mean: the darker neighbourhood first -> 0.5 / 4, then 1.5 / 4;
    # 0.5: 2 below -> 2.5 / 4; 1.0: 3 below -> 3.5 / 4 (plain mid-rank would give 0.25 to both zeros)
    np.testing.assert_allclose(normalise_intensity(img), [[0.125, 0.375], [0.625, 0.875]], atol=1e-7)
    # equal in level and local mean (mirror images of each other): the pair shares its mid-rank
    sym = np.array([[0.0, 0.0], [1.0, 1.0]], dtype=np.float32)  # local means 3/9, 3/9, 6/9, 6/9
    np.testing.assert_allclose(normalise_intensity(sym), [[0.25, 0.25], [0.75, 0.75]], atol=1e-7)
    # levels closer than 1/255 stay apart (RANK_LEVELS grey levels), in order
    fine = np.array([[0.5, 0.5 + 2.0 / (RANK_LEVELS - 1)]], dtype=np.float32).repeat(2, axis=0)
    np.testing.assert_allclose(normalise_intensity(fine), [[0.25, 0.75], [0.25, 0.75]], atol=1e-7)


def test_flat_region_stays_flat(images):
    for fname, img in images.items():
        flat = img.copy()
        flat[100:200, 150:260] = 0.4321
        out = normalise_intensity(flat)
        interior = out[101:199, 151:259]  # every 3 x 3 neighbourhood inside the block: one group
        assert interior.min() == interior.max(), f"{fname}: the interior of a flat block is not flat"
        # its edge pixels see the surroundings in their local mean: ranked apart from the interior
        assert np.unique(out[100:200, 150:260]).size > 1, fname
        # the group gets its mid-rank: (pixels before it + half of it) / all
        before = (out < interior[0, 0]).sum()
        n = (out == interior[0, 0]).sum()
        assert n >= interior.size
        assert abs(interior[0, 0] - (before + n / 2) / out.size) < 1e-6, fname


def test_rank_output_is_uniform_and_order_preserving(images):
    """Measured: 13 669-29 021 distinct output values (the input has 187-256 levels); the largest group of
    tied pixels (equal level and local mean) holds 0.3-0.6 % of a radiograph without a flat border, 2-14 %
    with one; percentile error vs uniform 0.0005-0.0012 (plain mid-rank: 0.006-0.009) without, 0.011-0.066
    with one, always less than half the largest group."""
    q = np.linspace(0.01, 0.99, 99)
    without_flat_area = 0
    for fname, img in images.items():
        out = normalise_intensity(img)
        assert out.dtype == np.float32 and out.shape == img.shape
        assert 0.0 < out.min() and out.max() < 1.0
        assert abs(float(out.mean(dtype=np.float64)) - 0.5) < 1e-6, fname  # mid-ranks average exactly 1/2
        # every output value is the mid-rank of its group of tied pixels: (pixels below + half the group) / all
        values, counts = np.unique(out, return_counts=True)
        np.testing.assert_allclose(values, (np.cumsum(counts) - counts / 2.0) / out.size, rtol=0, atol=1e-6)
        # ties inside a grey level are broken: far more output values than input levels
        assert values.size > 20 * np.unique(_levels(img)).size, f"{fname}: only {values.size} output values"
        # order-preserving: every pixel of a darker grey level ranks below every pixel of a brighter one
        lv = _levels(img).ravel()
        order = np.argsort(lv, kind="stable")
        starts = np.flatnonzero(np.r_[True, np.diff(lv[order]) > 0])
        lo = np.minimum.reduceat(out.ravel()[order], starts)
        hi = np.maximum.reduceat(out.ravel()[order], starts)
        assert (hi[:-1] < lo[1:]).all(), f"{fname}: a brighter pixel got a lower rank than a darker one"
        # equalised: the percentiles of the output sit at 0.01 ... 0.99, up to half the largest tied group
        err = np.abs(np.quantile(out, q) - q).max()
        largest = counts.max() / out.size
        assert err <= largest / 2 + 0.002, f"{fname}: percentile error {err:.4f}, largest tied group {largest:.4f}"
        if largest < 0.01:
            without_flat_area += 1
            assert err < 0.004, f"{fname}: output percentiles off uniform by {err:.4f}"
        assert np.abs(np.quantile(img, q) - q).max() > 0.05  # the input was not uniform already
    assert without_flat_area >= 2  # the tight bound was checked on real images


def test_apply_clahe_rank_is_rank_then_clahe(images):
    for fname, img in images.items():
        np.testing.assert_array_equal(apply_clahe(img, RANK), apply_clahe(normalise_intensity(img), NONE), fname)
        no_clahe = RANK.with_(clahe_clip_limit=0.0)
        np.testing.assert_array_equal(apply_clahe(img, no_clahe), normalise_intensity(img), fname)
        assert not np.array_equal(apply_clahe(img, RANK), apply_clahe(img, NONE))


@pytest.mark.parametrize("params", [RANK, NONE, RANK.with_(clahe_bits=16)], ids=["rank", "none", "rank16"])
def test_output_range_dtype_shape(images, params):
    for fname, img in images.items():
        crop = img[7:400, 30:333]  # not square, odd sizes
        out = apply_clahe(crop, params)
        assert out.dtype == np.float32 and out.shape == crop.shape, fname
        assert out.min() >= 0.0 and out.max() <= 1.0, fname
        assert out.max() - out.min() > 0.5, fname


@pytest.mark.parametrize("value", [0.0, 0.37, 1.0])
def test_constant_image_gives_constant_output(value):
    img = np.full((64, 80), value, dtype=np.float32)
    r = normalise_intensity(img)
    assert r.dtype == np.float32 and r.shape == img.shape
    np.testing.assert_array_equal(r, 0.5)  # one level: everybody's mid-rank
    for params in (RANK, NONE):
        out = apply_clahe(img, params)
        assert out.shape == img.shape and out.dtype == np.float32
        assert np.isfinite(out).all() and out.min() == out.max() and 0.0 <= out.min() <= 1.0


def test_params_round_trip_and_old_files():
    p = PreprocessParams.for_classifier(384, intensity="rank")
    assert p.intensity == "rank"
    assert PreprocessParams.from_dict(p.to_dict()) == p
    assert PreprocessParams.from_dict(p.to_dict()).intensity == "rank"
    assert p.with_(input_size=256).intensity == "rank"

    old = p.to_dict()
    del old["intensity"]  # a model file written before the field existed
    loaded = PreprocessParams.from_dict(old)
    assert loaded.intensity == "none"
    assert loaded == p.with_(intensity="none")
    assert PreprocessParams().intensity == "none"


def test_invalid_intensity_is_refused():
    with pytest.raises(ValueError, match="intensity"):
        PreprocessParams(intensity="equalise")
    with pytest.raises(ValueError, match="intensity"):
        PreprocessParams.from_dict({**PreprocessParams().to_dict(), "intensity": "Rank"})
    with pytest.raises(ValueError, match="intensity"):
        PreprocessParams().with_(intensity="")


def test_same_clahe_sees_the_intensity_mode():
    assert not RANK.same_clahe(NONE) and not NONE.same_clahe(RANK)
    assert RANK.same_clahe(PreprocessParams.for_detector(intensity="rank"))  # other fields do not matter
    assert PreprocessParams.for_classifier(intensity="rank").same_clahe(PreprocessParams.for_detector(intensity="rank"))
    assert not PreprocessParams.for_classifier().same_clahe(PreprocessParams.for_detector(intensity="rank"))
