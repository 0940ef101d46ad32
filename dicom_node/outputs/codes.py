"""The one table of coded concepts the node writes into its SR / GSPS outputs.

Finding codes for the 14 VinDr-CXR classes (ids as in ``inference.types.FINDING_CLASSES``) and
"No finding" (id 14). Sources, checked when the table was written:

- DICOM PS3.16 (read from pydicom 3.0's generated code dictionary, which is built from PS3.16; the
  CID numbers are where the concept is listed): SCT 60046008 Pleural effusion, SCT 36118008
  Pneumothorax (CID 6102/6105 chest findings), SCT 18115005 Pathologic calcification, SCT 52988006
  Lesion, DCM 112001 Opacity (CID 6102/6104), DCM 111286 No abnormality, SCT 17621005 Normal and
  SCT 263654008 Abnormal (CID 222/242), DCM 121402 Normality (TID 310, values from CID 222),
  DCM 122157 Probability, DCM 121071 Finding,
  LN 43468-8 XR unspecified body region (CID 100),
  DCM 123110 Artificial Intelligence (algorithm family).
- SNOMED CT browser pages: 786838002 Nodule of lung (is-a 309529002 Lung mass), 233703007
  Interstitial lung disease, 8186001 Cardiomegaly.
- DESIGN.md's verified list (the lead's check): 46621007 Atelectasis, 95436008 Lung consolidation,
  51615001 Fibrosis of lung, 309529002 Lung mass, 409609008 Radiologic infiltrate of lung.

No verified standard code was found for "Aortic enlargement" and "Pleural thickening" (neither is
in any PS3.16 chest CID, and no SNOMED CT concept id could be confirmed offline), so they use the
private coding scheme ``99DCMNODE`` (PS3.3 8.2: private schemes start with "99"). Replace them when
a verified SCT concept id is available; the scheme is declared in the SR's Coding Scheme
Identification Sequence (see :mod:`dicom_node.outputs.sr`).
"""

from __future__ import annotations

from pydicom.sr.coding import Code

from dicom_node.outputs.verdict import ABNORMAL as ABNORMAL_VERDICT
from dicom_node.outputs.verdict import NO_ABNORMALITY, NOT_ANALYSABLE
from inference.types import FINDING_CLASSES, NO_FINDING, NO_FINDING_ID

PRIVATE_SCHEME = "99DCMNODE"
PRIVATE_SCHEME_NAME = "dicom-node private codes"
PRIVATE_SCHEME_RESPONSIBLE = "dicom-node project"

# class id -> (code value, scheme, code meaning). Meanings are the scheme's own terms.
_FINDINGS: dict[int, tuple[str, str, str]] = {
    0: ("AORTENL", PRIVATE_SCHEME, "Aortic enlargement"),  # no verified SCT code
    1: ("46621007", "SCT", "Atelectasis"),
    2: ("18115005", "SCT", "Pathologic calcification"),
    3: ("8186001", "SCT", "Cardiomegaly"),
    4: ("95436008", "SCT", "Lung consolidation"),
    5: ("233703007", "SCT", "Interstitial lung disease"),
    6: ("409609008", "SCT", "Radiologic infiltrate of lung"),
    7: ("112001", "DCM", "Opacity"),
    8: ("309529002", "SCT", "Lung mass"),  # subsumes 786838002 Nodule of lung
    9: ("52988006", "SCT", "Lesion"),
    10: ("60046008", "SCT", "Pleural effusion"),
    11: ("PLTHICK", PRIVATE_SCHEME, "Pleural thickening"),  # no verified SCT code
    12: ("36118008", "SCT", "Pneumothorax"),
    13: ("51615001", "SCT", "Fibrosis of lung"),
    NO_FINDING_ID: ("111286", "DCM", "No abnormality"),
}
assert len(_FINDINGS) == len(FINDING_CLASSES) + 1

# Study-level evaluation and report structure.
NORMAL = Code("17621005", "SCT", "Normal")
ABNORMAL = Code("263654008", "SCT", "Abnormal")
INDETERMINATE = Code("82334004", "SCT", "Indeterminate")  # an image the models could not judge
FINDING = Code("121071", "DCM", "Finding")
NORMALITY = Code("121402", "DCM", "Normality")
PROBABILITY = Code("122157", "DCM", "Probability")
UNIT_NO_UNITS = Code("1", "UCUM", "no units")
PROCEDURE_XR = Code("43468-8", "LN", "XR unspecified body region")
COMMENT = Code("121106", "DCM", "Comment")
# A whole-image region's measurement: that image's P(abnormal) = 1 - P(no finding) (no standard concept found:
# private; its meaning is the notation of the statements, short enough for a label next to the image).
P_ABNORMAL = Code("PABNORM", PRIVATE_SCHEME, "P(abnormal)")
# An image the models could not judge: the image as the source of the measurement that was not made.
SOURCE_OF_MEASUREMENT = Code("121112", "DCM", "Source of Measurement")
# An urgent study's priority: SNOMED CT 260870009 |Priority (attribute)| = 103391001 (DICOM CID 3414 lists it as
# "Urgent Procedure", pydicom's SNOMED table as "Urgency (qualifier value)"; written "Urgent"), urgent studies only.
PRIORITY = Code("260870009", "SCT", "Priority")
URGENT = Code("103391001", "SCT", "Urgent")
# Modality codes for the Image Library (DCM, CID 29): the radiographs the node analyses.
MODALITIES = {
    "CR": Code("CR", "DCM", "Computed Radiography"),
    "DX": Code("DX", "DCM", "Digital Radiography"),
}
LANGUAGE = Code("en-US", "RFC5646", "English (United States)")  # as highdicom's MeasurementReport writes it
# TID 1500 row "Qualitative Evaluations" (its concept is from UMLS, as in PS3.16).
QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")

# Finding Site per class (PS3.16 / SNOMED CT anatomy as in pydicom's code dictionary) and whether a box on one
# side of the patient makes the site lateral (a heart or an aorta has no side).
LUNG = Code("39607008", "SCT", "Lung")
PLEURA = Code("3120008", "SCT", "Pleura")
HEART = Code("80891009", "SCT", "Heart")
THORACIC_AORTA = Code("113262008", "SCT", "Thoracic aorta")
CHEST = Code("816094009", "SCT", "Chest")
_SITES: dict[int, tuple[Code, bool]] = {
    0: (THORACIC_AORTA, False),
    1: (LUNG, True),
    2: (LUNG, True),
    3: (HEART, False),
    4: (LUNG, True),
    5: (LUNG, True),
    6: (LUNG, True),
    7: (LUNG, True),
    8: (LUNG, True),
    9: (CHEST, True),
    10: (PLEURA, True),
    11: (PLEURA, True),
    12: (PLEURA, True),
    13: (LUNG, True),
}
assert len(_SITES) == len(FINDING_CLASSES)

# The classifier's raw output, reported beside the fused study-level probability.
CLASSIFIER_P_ABNORMAL = Code("CLSPABN", PRIVATE_SCHEME, "Classifier probability of abnormality")
# Algorithm family of the AI pipeline (PS3.16 DCM code, listed in CID 7162).
ALGORITHM_FAMILY = Code("123110", "DCM", "Artificial Intelligence")


def finding_code(class_id: int) -> Code:
    """The coded concept for a VinDr-CXR class id (0-13) or 14 for "No finding"."""
    try:
        value, scheme, meaning = _FINDINGS[int(class_id)]
    except (KeyError, ValueError, TypeError):
        raise KeyError(f"unknown finding class id {class_id!r} (0-{NO_FINDING_ID})") from None
    return Code(value, scheme, meaning)


def finding_site(class_id: int) -> tuple[Code, bool]:
    """(anatomic site, whether it can have a laterality) for a finding class id (0-13)."""
    try:
        return _SITES[int(class_id)]
    except (KeyError, ValueError, TypeError):
        raise KeyError(f"unknown finding class id {class_id!r} (0-{NO_FINDING_ID - 1})") from None


def finding_label(class_id: int) -> str:
    """The short display label (the VinDr-CXR class name) for burned-in and GSPS text."""
    return NO_FINDING if int(class_id) == NO_FINDING_ID else FINDING_CLASSES[int(class_id)]


def verdict_code(verdict: str) -> Code:
    """The Finding code of a study's verdict (:mod:`dicom_node.outputs.verdict`): Abnormal, No abnormality, or
    Indeterminate for a study no image of which could be judged."""
    table = {ABNORMAL_VERDICT: ABNORMAL, NO_ABNORMALITY: finding_code(NO_FINDING_ID), NOT_ANALYSABLE: INDETERMINATE}
    try:
        return table[verdict]
    except KeyError:
        raise KeyError(f"unknown verdict {verdict!r}") from None
