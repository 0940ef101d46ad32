"""The SR's TID 1600 Image Library: one entry (TID 1601) per analysed image, with what its header says."""

from __future__ import annotations

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from dicom_node.outputs import codes as C
from dicom_node.outputs.source import patient_orientation

__all__ = ["image_library"]

_PIXELS = Code("{pixels}", "UCUM", "Pixels")
_SOURCE = Code("260753009", "SCT", "Source")


def image_library(sources: list[Dataset]) -> hd.sr.ContainerContentItem:
    """TID 1600 Image Library: one entry (TID 1601) per analysed image with its modality, matrix and, when the
    header has valid ones, patient orientation and pixel spacing (highdicom's own ImageLibrary insists on
    both for radiographs, and real CR/DX files often lack them)."""
    acq = hd.sr.RelationshipTypeValues.HAS_ACQ_CONTEXT
    group = hd.sr.ContainerContentItem(
        name=codes.DCM.ImageLibraryGroup, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )
    group.ContentSequence = hd.sr.ContentSequence()
    for ds in sources:
        image = hd.sr.ImageContentItem(
            name=_SOURCE,
            referenced_sop_class_uid=ds.SOPClassUID,
            referenced_sop_instance_uid=ds.SOPInstanceUID,
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        )
        modality = str(ds.get("Modality", "")).strip().upper()
        items: list = []
        if modality in C.MODALITIES:
            items.append(
                hd.sr.CodeContentItem(name=codes.DCM.Modality, value=C.MODALITIES[modality], relationship_type=acq)
            )
        for name, value in ((codes.DCM.PixelDataRows, ds.Rows), (codes.DCM.PixelDataColumns, ds.Columns)):
            items.append(hd.sr.NumContentItem(name=name, value=int(value), unit=_PIXELS, relationship_type=acq))
        orientation = patient_orientation(ds)
        if orientation is not None:
            items.append(
                hd.sr.TextContentItem(name=codes.DCM.PatientOrientationRow, value=orientation[0], relationship_type=acq)
            )
            items.append(
                hd.sr.TextContentItem(
                    name=codes.DCM.PatientOrientationColumn, value=orientation[1], relationship_type=acq
                )
            )
        spacing = ds.get("ImagerPixelSpacing") or ds.get("PixelSpacing")
        try:
            row_mm, col_mm = (float(v) for v in spacing)
        except (TypeError, ValueError):
            row_mm = col_mm = 0.0
        if row_mm > 0 and col_mm > 0:
            items.append(
                hd.sr.NumContentItem(
                    name=codes.DCM.HorizontalPixelSpacing,
                    value=col_mm,
                    unit=codes.UCUM.Millimeter,
                    relationship_type=acq,
                )
            )
            items.append(
                hd.sr.NumContentItem(
                    name=codes.DCM.VerticalPixelSpacing, value=row_mm, unit=codes.UCUM.Millimeter, relationship_type=acq
                )
            )
        image.ContentSequence = hd.sr.ContentSequence(items)
        group.ContentSequence.append(image)
    library = hd.sr.ContainerContentItem(
        name=codes.DCM.ImageLibrary, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )
    library.ContentSequence = hd.sr.ContentSequence([group])
    return library
