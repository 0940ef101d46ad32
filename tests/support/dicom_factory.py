"""Synthetic chest radiographs for tests: valid DX / CR image storage objects, plus compressed copies.

``make_cxr()`` builds a dataset that passes ``dciodvfy`` without errors (DX For Presentation or CR
Image Storage), with a chest-like picture: dark lungs, a bright mediastinum and spine, a body outline.
Any attribute can be overridden through ``**extra`` (keyword=value; ``None`` deletes it). Pass
``pixels=`` to store exact values. ``compress(path, syntax)`` writes a compressed copy with the dcmtk
command-line tools (JPEG 2000 through pydicom + pylibjpeg-openjpeg, dcmtk in Debian lacks it).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    JPEG2000,
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    generate_uid,
)

DX_FOR_PRESENTATION = UID("1.2.840.10008.5.1.4.1.1.1.1")
CR_IMAGE = UID("1.2.840.10008.5.1.4.1.1.1")

SYNTAXES = {
    # name: (command, extra args) ; output transfer syntax is what the tool writes
    "jpeg-ls": ("dcmcjpls", ["+el"]),  # JPEG-LS lossless 1.2.840.10008.1.2.4.80
    "jpeg-ls-near": ("dcmcjpls", ["+en"]),  # JPEG-LS near-lossless .81
    "rle": ("dcmcrle", []),  # RLE lossless 1.2.840.10008.1.2.5
    "jpeg-lossless": ("dcmcjpeg", ["+e1"]),  # JPEG lossless SV1 1.2.840.10008.1.2.4.70
    "jpeg-lossless-p14": ("dcmcjpeg", ["+el"]),  # JPEG lossless process 14 .57
    "jpeg-baseline": ("dcmcjpeg", ["+eb"]),  # JPEG baseline 8 bit .50 (8-bit images only)
    "jpeg-extended": ("dcmcjpeg", ["+ee"]),  # JPEG extended 12 bit .51
    "deflate": ("dcmconv", ["+td"]),  # Deflated explicit VR little endian 1.2.840.10008.1.2.1.99
}


def _chest_picture(rows: int, cols: int, seed: int = 7) -> np.ndarray:
    """A smooth chest-like image in [0, 1] as displayed (1 = white = dense)."""
    y, x = np.mgrid[0:rows, 0:cols].astype(np.float64)
    yn, xn = (y + 0.5) / rows, (x + 0.5) / cols

    def ellipse(cx, cy, rx, ry):
        return ((xn - cx) / rx) ** 2 + ((yn - cy) / ry) ** 2 <= 1.0

    img = np.full((rows, cols), 0.05)  # air outside the body: dark
    img[ellipse(0.5, 0.55, 0.47, 0.55)] = 0.55  # soft tissue
    for cx in (0.3, 0.7):  # lungs: dark
        img[ellipse(cx, 0.48, 0.15, 0.3)] = 0.22
    img[ellipse(0.5, 0.55, 0.08, 0.35)] = 0.85  # mediastinum / spine: bright
    img[ellipse(0.56, 0.66, 0.14, 0.12)] = 0.8  # heart
    rng = np.random.default_rng(seed)
    img += rng.normal(0.0, 0.02, img.shape)
    ky = np.exp(-0.5 * (np.arange(-4, 5) / 2.0) ** 2)
    ky /= ky.sum()
    img = np.apply_along_axis(lambda r: np.convolve(r, ky, mode="same"), 1, img)
    img = np.apply_along_axis(lambda c: np.convolve(c, ky, mode="same"), 0, img)
    return np.clip(img, 0.0, 1.0)


def _stored_values(picture: np.ndarray, bits_stored: int, signed: bool, monochrome1: bool) -> np.ndarray:
    levels = 2**bits_stored - 1
    values = np.rint((1.0 - picture if monochrome1 else picture) * levels).astype(np.int64)
    if signed:
        values -= 2 ** (bits_stored - 1)
    return values


def make_cxr(
    path: str | Path | None = None,
    *,
    modality: str = "DX",
    view: str | None = "PA",
    body_part: str | None = "CHEST",
    photometric: str = "MONOCHROME2",
    bits_stored: int = 12,
    rows: int = 256,
    cols: int = 256,
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_uid: str | None = None,
    patient_name: str = "TEST^CHEST^SYNTHETIC",
    patient_id: str = "DCMNODE-TEST-0001",
    signed: bool = False,
    pixels: np.ndarray | None = None,
    window: tuple[float, float] | None | bool = True,
    **extra,
) -> Dataset:
    """A valid single-frame DX (For Presentation) or CR chest radiograph.

    ``window=True`` writes a window covering the stored range, ``None``/``False`` writes none,
    a ``(center, width)`` pair writes that. ``pixels`` are stored values (rows x cols) used as given.
    For MONOCHROME1 the synthetic picture is stored inverted, so it still looks like a chest.
    ``extra`` sets or (with None) deletes attributes by keyword after everything else.
    """
    if modality not in ("DX", "CR"):
        raise ValueError("modality must be DX or CR (use extra=... for anything else)")
    bits_allocated = 8 if bits_stored <= 8 else 16
    if pixels is None:
        pixels = _stored_values(_chest_picture(rows, cols), bits_stored, signed, photometric == "MONOCHROME1")
    pixels = np.asarray(pixels)
    rows, cols = pixels.shape
    dtype = {(8, False): np.uint8, (8, True): np.int8, (16, False): np.uint16, (16, True): np.int16}
    pixels = pixels.astype(dtype[(bits_allocated, signed)])

    sop_class = DX_FOR_PRESENTATION if modality == "DX" else CR_IMAGE
    sop_uid = sop_uid or generate_uid()
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID

    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop_uid
    ds.StudyDate, ds.StudyTime = "20240102", "101500"
    ds.SeriesDate, ds.SeriesTime = "20240102", "101600"
    ds.ContentDate, ds.ContentTime = "20240102", "101700"
    ds.AccessionNumber = "ACC0001"
    ds.Modality = modality
    ds.Manufacturer = "dicom-node tests"
    ds.InstitutionName = "Test Hospital"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "XR CHEST"
    ds.SeriesDescription = f"CHEST {view or ''}".strip()
    ds.PatientName, ds.PatientID = patient_name, patient_id
    ds.PatientBirthDate, ds.PatientSex = "19700101", "O"
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = "1", 1, 1
    ds.PatientOrientation = ["L", "F"] if view != "AP" else ["R", "F"]
    ds.ImageLaterality = "U"
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    if body_part:
        ds.BodyPartExamined = body_part
    if view:
        ds.ViewPosition = view
    if modality == "DX":
        ds.PositionerType = "NONE"

    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits_allocated, bits_stored, bits_stored - 1
    ds.PixelRepresentation = 1 if signed else 0
    ds.PixelData = pixels.tobytes()
    ds["PixelData"].VR = "OB" if bits_allocated == 8 else "OW"
    ds.PresentationLUTShape = "INVERSE" if photometric == "MONOCHROME1" else "IDENTITY"
    ds.ImagerPixelSpacing = [0.5, 0.5]

    if modality == "DX":
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.PixelIntensityRelationship = "LOG"
        ds.PixelIntensityRelationshipSign = -1 if photometric == "MONOCHROME1" else 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "US"
        ds.DetectorType = "SCINTILLATOR"
        ds.AcquisitionContextSequence = Sequence()
        ds.AnatomicRegionSequence = Sequence([_code("51185008", "SCT", "Thorax")])
        view_code = {"PA": ("399348003", "postero-anterior"), "AP": ("399025009", "antero-posterior")}
        if view in view_code:
            ds.ViewCodeSequence = Sequence([_code(view_code[view][0], "SCT", view_code[view][1])])
            ds.ViewCodeSequence[0].ViewModifierCodeSequence = Sequence()
    else:
        ds.ImageType = ["ORIGINAL", "PRIMARY"]

    if window is True:
        lo = -(2 ** (bits_stored - 1)) if signed else 0
        ds.WindowCenter, ds.WindowWidth = lo + 2 ** (bits_stored - 1), 2**bits_stored
    elif isinstance(window, tuple):
        ds.WindowCenter, ds.WindowWidth = window

    for keyword, value in extra.items():
        if value is None:
            if keyword in ds:
                delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)

    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
    return ds


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def compress(path: str | Path, syntax: str, out: str | Path | None = None) -> Path:
    """Write a compressed copy of ``path`` (``<stem>.<syntax>.dcm`` beside it unless ``out``).

    ``syntax``: one of ``SYNTAXES`` (dcmtk tools) or ``jpeg2000`` / ``jpeg2000-lossless``
    (pydicom + pylibjpeg-openjpeg). Raises RuntimeError with the tool's message if it fails.
    """
    path = Path(path)
    out = Path(out) if out is not None else path.with_name(f"{path.stem}.{syntax}.dcm")
    if syntax in ("jpeg2000", "jpeg2000-lossless"):
        import pydicom

        ds = pydicom.dcmread(path)
        uid = JPEG2000Lossless if syntax == "jpeg2000-lossless" else JPEG2000
        kwargs = {} if uid == JPEG2000Lossless else {"j2k_cr": [10]}
        ds.compress(uid, encoding_plugin="pylibjpeg", **kwargs)
        ds.save_as(out, enforce_file_format=True)
        return out
    if syntax not in SYNTAXES:
        raise ValueError(f"unknown syntax {syntax!r}; known: {sorted(SYNTAXES) + ['jpeg2000', 'jpeg2000-lossless']}")
    tool, args = SYNTAXES[syntax]
    if shutil.which(tool) is None:
        raise RuntimeError(f"{tool} (dcmtk) is not installed")
    proc = subprocess.run([tool, *args, str(path), str(out)], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0 or not out.exists():
        raise RuntimeError(f"{tool} {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return out
