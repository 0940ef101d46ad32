"""inference.preprocess: CLAHE, letterbox geometry, model inputs, training export."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from inference.preprocess import (
    PAD_VALUE,
    Letterbox,
    PreprocessParams,
    apply_clahe,
    check_image,
    export_image,
    export_scale,
    letterbox,
    prepare,
    to_model_input,
)


def _low_contrast(h=240, w=320, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = 0.45 + 0.05 * np.sin(xx / 17.0) * np.cos(yy / 23.0) + 0.01 * rng.standard_normal((h, w))
    return img.astype(np.float32)


def test_params_round_trip_and_validation():
    p = PreprocessParams.for_classifier(384, clahe_clip_limit=3.0)
    assert PreprocessParams.from_dict(p.to_dict()) == p
    assert p.channels == 1 and p.input_size == 384
    d = PreprocessParams.for_detector()
    assert d.channels == 3 and d.input_size == 512 and d.mean == 0 and d.std == 1
    assert p.same_clahe(PreprocessParams(clahe_clip_limit=3.0)) and not p.same_clahe(d)
    with pytest.raises(ValueError, match="unknown preprocessing keys"):
        PreprocessParams.from_dict({**d.to_dict(), "gamma": 2})
    with pytest.raises(ValueError, match="clahe_bits"):
        PreprocessParams(clahe_bits=12)


def test_check_image_refuses_bad_input():
    with pytest.raises(ValueError, match="2-D"):
        check_image(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ValueError, match="floating point"):
        check_image(np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match="NaN"):
        check_image(np.full((4, 4), np.nan, np.float32))
    out = check_image(np.array([[-1.0, 0.5], [2.0, 1.0]]))
    assert out.dtype == np.float32 and out.min() == 0 and out.max() == 1


@pytest.mark.parametrize("bits", [8, 16])
def test_clahe_raises_local_contrast_within_unit_range(bits):
    img = _low_contrast()
    out = apply_clahe(img, PreprocessParams(clahe_bits=bits))
    assert out.shape == img.shape and out.dtype == np.float32
    assert 0.0 <= out.min() and out.max() <= 1.0
    assert out.std() > 1.5 * img.std()


def test_clahe_disabled_is_identity_and_8bit_matches_opencv():
    img = _low_contrast()
    np.testing.assert_array_equal(apply_clahe(img, PreprocessParams(clahe_clip_limit=0)), img)
    u8 = np.rint(img * 255).astype(np.uint8)
    ref = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8)).apply(u8)
    # a uint8 PNG read as /255 goes through CLAHE exactly like OpenCV on the PNG itself
    np.testing.assert_array_equal(export_image(u8.astype(np.float32) / 255), ref)


@pytest.mark.parametrize(
    "shape,size", [((300, 500), 128), ((500, 300), 128), ((1000, 37), 256), ((60, 90), 512), ((128, 128), 128)]
)
def test_letterbox_keeps_aspect_and_centres(shape, size):
    img = np.ones(shape, np.float32)
    out, g = letterbox(img, size)
    assert out.shape == (size, size)
    rh, rw = g.resized_shape
    assert max(rh, rw) == size
    assert abs(rh / rw - shape[0] / shape[1]) <= 1.0 / min(rh, rw) * (shape[0] / shape[1]) + 1e-9
    assert abs(g.pad_x - (size - rw) / 2) <= 0.5 and abs(g.pad_y - (size - rh) / 2) <= 0.5
    content = out[g.pad_y : g.pad_y + rh, g.pad_x : g.pad_x + rw]
    np.testing.assert_allclose(content, 1.0, atol=1e-5)
    padded = out.copy()
    padded[g.pad_y : g.pad_y + rh, g.pad_x : g.pad_x + rw] = PAD_VALUE
    np.testing.assert_allclose(padded, PAD_VALUE)


@pytest.mark.parametrize("shape", [(300, 500), (500, 300), (1000, 37), (61, 90)])
def test_box_round_trip_is_exact(shape):
    _, g = letterbox(np.zeros(shape, np.float32), 160)
    h, w = shape
    rng = np.random.default_rng(1)
    x = np.sort(rng.uniform(0, w, (50, 2)), axis=1)
    y = np.sort(rng.uniform(0, h, (50, 2)), axis=1)
    boxes = np.stack([x[:, 0], y[:, 0], x[:, 1], y[:, 1]], axis=1)
    back = g.to_source(g.to_input(boxes))
    np.testing.assert_allclose(back, boxes, atol=1e-6)
    inp = g.to_input(boxes)
    assert (inp >= 0).all() and (inp <= 160).all()


@pytest.mark.parametrize("shape", [(300, 500), (500, 300), (700, 260)])
def test_box_maps_to_the_drawn_object(shape):
    """A bright rectangle in the source, found in the letterboxed input, maps back onto itself."""
    h, w = shape
    src_box = np.array([0.2 * w, 0.3 * h, 0.7 * w, 0.6 * h]).round()
    img = np.zeros(shape, np.float32)
    x0, y0, x1, y1 = src_box.astype(int)
    img[y0:y1, x0:x1] = 1.0  # pixels x0..x1-1 -> box edges x0, x1
    out, g = letterbox(img, 256, pad_value=0.0)
    ys, xs = np.nonzero(out > 0.5)
    found = np.array([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], float)
    back = g.to_source(found)[0]
    one_input_px = 1.0 / min(g.scale_x, g.scale_y)
    np.testing.assert_allclose(back, src_box, atol=one_input_px + 1e-6)


def test_to_source_clips_to_image_and_handles_empty():
    _, g = letterbox(np.zeros((100, 200), np.float32), 64)
    out = g.to_source([[-10, -10, 70, 70]])
    assert out.tolist() == [[0, 0, 200, 100]]
    assert g.to_source(np.zeros((0, 4))).shape == (0, 4)
    unclipped = g.to_source([[-10, -10, 70, 70]], clip=False)
    assert unclipped[0, 0] < 0 and unclipped[0, 2] > 200
    with pytest.raises(ValueError, match=r"\(N, 4\)"):
        g.to_source([[1, 2, 3]])
    assert isinstance(g, Letterbox) and g.to_dict()["src_shape"] == (100, 200)


def test_prepare_channels_and_normalisation():
    img = _low_contrast(100, 300)
    pc = PreprocessParams.for_classifier(96)
    x, g = prepare(img, pc)
    assert x.shape == (1, 96, 96) and x.dtype == np.float32
    assert x[0, 0, 0] == pytest.approx((PAD_VALUE - 0.5) / 0.25, abs=1e-6)  # padding row on top
    pd = PreprocessParams.for_detector(128)
    xd, gd = prepare(img, pd)
    assert xd.shape == (3, 128, 128)
    np.testing.assert_array_equal(xd[0], xd[2])
    assert 0.0 <= xd.min() and xd.max() <= 1.0
    # to_model_input does not apply CLAHE again
    x2, _ = to_model_input(apply_clahe(img, pd), pd)
    np.testing.assert_array_equal(x2, xd)


def test_export_image_resizes_keeping_aspect():
    img = _low_contrast(400, 1000)
    out = export_image(img, max_size=500)
    assert out.dtype == np.uint8 and out.shape == (200, 500)
    assert export_scale(img.shape, 500) == 0.5
    assert export_scale(img.shape, None) == 1.0 and export_image(img).shape == img.shape
