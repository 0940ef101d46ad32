"""dicom_node.imaging.pixels: real sample files and synthetic datasets in every transfer syntax we accept."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import ImplicitVRLittleEndian

from dicom_node.errors import PixelDataError
from dicom_node.imaging.pixels import decode_image, display_window, load_image, read_dataset, read_header
from support.dicom_factory import compress, make_cxr


def bands(img: np.ndarray) -> tuple[float, float]:
    """(mean of the central column band, mean of the two lateral lung bands), rows 30-70 %."""
    h, w = img.shape
    r = slice(int(h * 0.3), int(h * 0.7))
    central = img[r, int(w * 0.45) : int(w * 0.55)].mean()
    lateral = (img[r, int(w * 0.2) : int(w * 0.35)].mean() + img[r, int(w * 0.65) : int(w * 0.8)].mean()) / 2
    return float(central), float(lateral)


def check_range(img: np.ndarray, shape: tuple[int, int]) -> None:
    assert img.dtype == np.float32 and img.shape == shape
    assert np.isfinite(img).all() and img.min() >= 0.0 and img.max() <= 1.0
    assert img.max() - img.min() > 0.3, "the image should use most of the display range"


# --- real files --------------------------------------------------------------------------------


def test_real_no_meta_monochrome1_chest_lungs_dark_mediastinum_bright(samples_dir):
    path = samples_dir / "fodicom_CR-MONO1-10-chest.dcm"
    with pytest.raises(pydicom.errors.InvalidDicomError):
        pydicom.dcmread(path)  # really has no Part 10 header
    header = read_header(path)
    assert header.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
    assert header.PhotometricInterpretation == "MONOCHROME1" and "PixelData" not in header
    img = load_image(path)
    check_range(img, (440, 440))
    central, lateral = bands(img)
    assert central > lateral + 0.15, (central, lateral)  # inverted: mediastinum bright, lungs dark
    # without the inversion the picture would be the other way round
    ds = read_dataset(path)
    ds.PhotometricInterpretation = "MONOCHROME2"
    c2, l2 = bands(load_image(ds))
    assert c2 < l2


def test_real_jpeg2000_keeps_shape_and_ignores_zero_pixel_spacing(samples_dir):
    path = samples_dir / "pydicomdata_RG1_J2KI.dcm"
    ds = read_dataset(path)
    assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.91"
    assert [float(v) for v in ds.PixelSpacing] == [0.0, 0.0]
    img = load_image(ds)
    check_range(img, (1955, 1841))
    central, lateral = bands(img)
    assert central > lateral, (central, lateral)
    assert display_window(ds) == (15000.0, 30000.0)


# --- synthetic: photometric, bit depths, LUTs ---------------------------------------------------


def test_monochrome1_and_monochrome2_of_the_same_data_are_inverted():
    m2 = make_cxr(photometric="MONOCHROME2")
    m1 = make_cxr(photometric="MONOCHROME1", pixels=m2.pixel_array, WindowCenter=None, WindowWidth=None)
    m2_nowin = make_cxr(photometric="MONOCHROME2", pixels=m2.pixel_array, window=None)
    a, b = load_image(m2_nowin), load_image(m1)
    np.testing.assert_allclose(a, 1.0 - b, atol=1e-6)
    central, lateral = bands(load_image(m2))
    assert central > lateral


@pytest.mark.parametrize(
    "bits,signed,modality",
    [
        (8, False, "DX"),
        (10, False, "DX"),
        (12, False, "DX"),
        (15, False, "CR"),
        (16, False, "CR"),
        (16, True, "CR"),
        (12, True, "CR"),
    ],
)
def test_bit_depths_give_the_same_picture(bits, signed, modality):
    img = load_image(make_cxr(bits_stored=bits, signed=signed, modality=modality, rows=200, cols=180))
    check_range(img, (200, 180))
    ref = load_image(make_cxr(bits_stored=12, rows=200, cols=180))
    assert np.abs(img - ref).mean() < 0.01  # same picture whatever the encoding
    central, lateral = bands(img)
    assert central > lateral


def test_rescale_slope_intercept_is_applied_before_the_window():
    base = make_cxr(bits_stored=12, window=None)
    stored = base.pixel_array
    # the window is given in rescaled units: the same display only if the rescale is applied
    rescaled = make_cxr(
        bits_stored=12, pixels=stored, RescaleSlope=2, RescaleIntercept=-1000, window=(2 * 2048 - 1000, 2 * 4096)
    )
    plain = make_cxr(bits_stored=12, pixels=stored, window=(2048, 4096))
    np.testing.assert_allclose(load_image(rescaled), load_image(plain), atol=1e-3)
    assert display_window(rescaled) == (3096.0, 8192.0)


def test_modality_lut_sequence_is_applied():
    stored = make_cxr(bits_stored=10, window=None).pixel_array
    item = Dataset()
    item.LUTDescriptor = [1024, 0, 16]
    item.ModalityLUTType = "US"
    item.LUTData = [int(v) for v in (1023 - np.arange(1024)) * 60]  # inverting LUT, 0..61380
    ds = make_cxr(
        bits_stored=10,
        pixels=stored,
        window=None,
        RescaleSlope=None,
        RescaleIntercept=None,
        RescaleType=None,
        ModalityLUTSequence=Sequence([item]),
    )
    plain = load_image(make_cxr(bits_stored=10, pixels=stored, window=None))
    np.testing.assert_allclose(load_image(ds), 1.0 - plain, atol=0.02)


def test_voi_lut_sequence_is_used_instead_of_the_window():
    stored = make_cxr(bits_stored=12, window=None).pixel_array
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 12]
    item.LUTData = [int(round(4095 * (v / 4095) ** 2)) for v in range(4096)]  # a gamma curve
    ds = make_cxr(bits_stored=12, pixels=stored, window=(100, 50), VOILUTSequence=Sequence([item]))
    expected = (stored.astype(np.float64) / 4095) ** 2
    np.testing.assert_allclose(load_image(ds), expected, atol=2e-3)
    assert display_window(ds) is None


def test_multi_valued_window_uses_the_first_and_ignores_the_explanation():
    stored = make_cxr(bits_stored=12, window=None).pixel_array
    ds = make_cxr(
        bits_stored=12,
        pixels=stored,
        WindowCenter=[1500, 3000],
        WindowWidth=[1000, 200],
        WindowCenterWidthExplanation=["SOFT", "BONE"],
    )
    assert display_window(ds) == (1500.0, 1000.0)
    one = make_cxr(bits_stored=12, pixels=stored, window=(1500, 1000))
    np.testing.assert_array_equal(load_image(ds), load_image(one))


@pytest.mark.parametrize("window", [(2048, 1), (2048, 0), (2048, -5), (100000, 10), (-5000, 100), None])
def test_nonsense_or_missing_window_falls_back_to_percentiles(window):
    stored = make_cxr(bits_stored=12, window=None).pixel_array
    ds = make_cxr(bits_stored=12, pixels=stored, window=window)
    img = load_image(ds)
    check_range(img, stored.shape)
    lo, hi = np.percentile(stored, [0.5, 99.5])
    expected = np.clip((stored - lo) / (hi - lo), 0, 1)
    np.testing.assert_allclose(img, expected, atol=1e-5)
    c, w = display_window(ds)
    assert c == pytest.approx((lo + hi) / 2) and w == pytest.approx(hi - lo)


def test_constant_image_gives_zeros_not_nan():
    ds = make_cxr(pixels=np.full((32, 32), 700), window=None)
    img = load_image(ds)
    assert img.shape == (32, 32) and not img.any()


# --- compressed transfer syntaxes -------------------------------------------------------------


@pytest.mark.parametrize(
    "syntax", ["jpeg-ls", "rle", "jpeg-lossless", "jpeg-lossless-p14", "deflate", "jpeg2000-lossless"]
)
@pytest.mark.parametrize("photometric,bits", [("MONOCHROME2", 12), ("MONOCHROME1", 16), ("MONOCHROME2", 8)])
def test_lossless_syntaxes_decode_exactly_like_the_uncompressed(tmp_path, syntax, photometric, bits):
    src = tmp_path / "plain.dcm"
    make_cxr(src, modality="CR" if bits == 16 else "DX", photometric=photometric, bits_stored=bits, rows=160, cols=128)
    packed = compress(src, syntax)
    assert pydicom.dcmread(packed).file_meta.TransferSyntaxUID != pydicom.dcmread(src).file_meta.TransferSyntaxUID
    np.testing.assert_array_equal(load_image(packed), load_image(src))


@pytest.mark.parametrize(
    "syntax,tolerance", [("jpeg-baseline", 0.03), ("jpeg-extended", 0.01), ("jpeg2000", 0.01), ("jpeg-ls-near", 0.01)]
)
def test_lossy_syntaxes_decode_close_to_the_uncompressed(tmp_path, syntax, tolerance):
    src = tmp_path / "plain.dcm"
    make_cxr(src, bits_stored=8 if syntax == "jpeg-baseline" else 12, rows=160, cols=128)
    packed = compress(src, syntax)
    a, b = load_image(packed), load_image(src)
    assert a.shape == b.shape and np.abs(a - b).max() < tolerance * 3 and np.abs(a - b).mean() < tolerance


# --- refusals ---------------------------------------------------------------------------------


def test_multi_frame_is_refused():
    ds = make_cxr(rows=64, cols=64)
    ds.NumberOfFrames = 2
    ds.PixelData = ds.PixelData * 2
    with pytest.raises(PixelDataError, match="multi-frame"):
        load_image(ds)


@pytest.mark.parametrize("photometric", ["RGB", "YBR_FULL"])
def test_colour_is_refused(photometric):
    ds = make_cxr(rows=64, cols=64, bits_stored=8)
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, photometric, 0
    ds.PixelData = np.zeros((64, 64, 3), np.uint8).tobytes()
    with pytest.raises(PixelDataError, match="colour"):
        load_image(ds)


def test_missing_pixel_data_is_refused(tmp_path):
    ds = make_cxr(rows=32, cols=32)
    del ds.PixelData
    with pytest.raises(PixelDataError, match="no Pixel Data"):
        load_image(ds)


def test_truncated_pixel_data_is_a_pixel_data_error():
    ds = make_cxr(rows=64, cols=64)
    ds.PixelData = ds.PixelData[:100]
    with pytest.raises(PixelDataError, match="cannot decode"):
        load_image(ds)


def test_not_dicom_is_a_pixel_data_error(tmp_path):
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"")
    with pytest.raises(PixelDataError):
        load_image(junk)


def test_no_meta_dataset_in_memory_gets_a_transfer_syntax(tmp_path):
    path = tmp_path / "raw.dcm"
    ds = make_cxr(rows=48, cols=40)
    del ds.file_meta
    pydicom.dcmwrite(path, ds, implicit_vr=True, little_endian=True)  # bare dataset, no meta
    assert path.read_bytes()[128:132] != b"DICM"
    raw = pydicom.dcmread(path, force=True)
    assert "TransferSyntaxUID" not in getattr(raw, "file_meta", {})
    img = load_image(raw)
    assert img.shape == (48, 40)
    assert raw.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian


def _area_down(img: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    import cv2

    return cv2.resize(img, (shape[1], shape[0]), interpolation=cv2.INTER_AREA)


def test_real_jpeg2000_decoded_at_a_resolution_level_when_the_models_need_fewer_pixels(samples_dir):
    path = samples_dir / "pydicomdata_RG1_J2KI.dcm"
    full, window = decode_image(path)
    reduced, reduced_window = decode_image(path, at_least=512)
    assert full.shape == (1955, 1841)
    assert reduced.shape == (978, 921)  # one level: both sides halved, rounded up; 489 would be < 512
    assert reduced_window == window
    diff = np.abs(reduced - _area_down(full, reduced.shape))
    assert diff.mean() < 0.005 and np.percentile(diff, 99) < 0.05  # the same picture, half the size
    assert decode_image(path, at_least=1000)[0].shape == full.shape  # a level would be too small: full decode


@pytest.mark.parametrize("bits", [8, 12, 16])
def test_jpeg2000_resolution_level_keeps_the_values_of_every_bit_depth(tmp_path, bits):
    """Pillow hands 9-15 bit codestreams back scaled to 16 bits; the stored values must come back unscaled."""
    from pydicom.uid import JPEG2000Lossless

    ds = make_cxr(rows=1200, cols=1000, bits_stored=bits)
    ds.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg")
    ds.save_as(tmp_path / "j2k.dcm", enforce_file_format=True)
    full, _ = decode_image(tmp_path / "j2k.dcm")
    reduced, _ = decode_image(tmp_path / "j2k.dcm", at_least=512)
    assert reduced.shape == (600, 500)
    diff = np.abs(reduced - _area_down(full, reduced.shape))
    assert diff.mean() < 0.01, diff.mean()


def test_a_header_that_claims_a_huge_image_is_refused_before_decoding(tmp_path):
    """A JPEG 2000 frame of a few kB whose header says 60000 x 60000: refused with a reason, nothing decoded."""
    make_cxr(tmp_path / "small.dcm", rows=64, cols=64)
    j2k = compress(tmp_path / "small.dcm", "jpeg2000-lossless")
    ds = pydicom.dcmread(j2k)
    ds.Rows = ds.Columns = 60000
    ds.save_as(tmp_path / "bomb.dcm")
    with pytest.raises(PixelDataError, match="too large to decode"):
        decode_image(tmp_path / "bomb.dcm")
