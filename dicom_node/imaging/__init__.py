"""DICOM pixels to images in [0, 1]: modality/VOI LUT, MONOCHROME1, codecs, JPEG 2000 resolution levels."""
