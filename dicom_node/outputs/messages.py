"""Notification payloads: what an HL7, FHIR, webhook (JSON, Teams, Slack) or email destination receives about one
analysed study. Pure: the analyser calls them when it encodes a job's outputs, the bytes are stored as a result
and the sender only transmits them (:mod:`dicom_node.net.channels`).

Every payload is made from one :class:`StudySummary` (:func:`summarise`) around the study's
:class:`~dicom_node.outputs.verdict.StudyVerdict`, the one the SR, the SC and GSPS captions state: the same
verdict, statement, priority (with its reasons) and findings (each box, strongest first).

Patient data (name, ID, birth date, sex) goes into a payload only when its destination sets ``include_phi: true``;
otherwise a message carries the accession number, the Study Instance UID, the verdict, the priority, the
findings with their probabilities and the console link, and nothing else about the patient:

- HL7 v2.5.1 ORU^R01 (python-hl7 containers, every value escaped by the library): MSH (the destination's
  applications and facilities), PID (PID-3 patient ID, PID-5 name, PID-7 birth date, PID-8 sex with
  ``include_phi``; else PID-1 only), ORC and OBR (accession number as placer and filler order number, OBR-5
  and the ORC/OBR quantity-timing priority S = urgent / R = routine, OBR-24 RAD, OBR-25 P = preliminary), then
  OBX: 1 the study statement (ST, OBX-8 "A" abnormal / "N" no abnormality), 2 the priority (ST), 3 the Study UID
  (HD, DCM 110180), then one NM per finding: its code (SNOMED CT or the node's private scheme), its probability,
  OBX-8 "A"; an NTE says "AI result - not for primary diagnosis".
- FHIR R4 transaction Bundle, validated with ``fhir.resources`` (its R4B models: these resources are the same in
  R4 and R4B): a DiagnosticReport (status preliminary, category LOINC LP29684-5 and HL7 v2-0074 RAD, code LOINC
  18748-4 "Diagnostic imaging study", conclusion = the statement, conclusionCode the SR's verdict code (Abnormal,
  No abnormality, Indeterminate), meta.tag v3-ActPriority S or R, imagingStudy a
  logical reference by identifier urn:dicom:uid / urn:oid:<Study UID>, basedOn the order by its accession number
  (identifier type v2-0203 ACSN), subject a logical reference by patient ID only with ``include_phi``) and one
  Observation per finding (code, valueQuantity probability in UCUM "1", bodySite chest, interpretation A).
- Webhook JSON (:func:`webhook_json`), and Teams, Slack and email bodies rendered from the Jinja2 templates in
  ``dicom_node/outputs/templates`` (or the destination's own ``template``) with the context of
  :meth:`StudySummary.context`.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email import policy
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from pathlib import Path
from typing import Any

import hl7
import jinja2
from pydicom.dataset import Dataset

from dicom_node.config import (
    EmailDestinationConfig,
    FHIRDestinationConfig,
    HL7DestinationConfig,
    NotificationConfig,
    WebhookDestinationConfig,
)
from dicom_node.errors import EncodingError
from dicom_node.outputs import codes as C
from dicom_node.outputs.captions import BANNER_TEXT
from dicom_node.outputs.verdict import ABNORMAL, NO_ABNORMALITY, ROUTINE, URGENT, StudyVerdict, study_verdict
from inference.types import Prediction

__all__ = [
    "StudySummary",
    "summarise",
    "hl7_oru",
    "fhir_bundle",
    "webhook_json",
    "rendered",
    "email_message",
    "payload_for",
    "PAYLOAD_SUFFIX",
]

TEMPLATES = Path(__file__).with_name("templates")
PAYLOAD_SUFFIX = {"hl7": ".hl7", "fhir": ".json", "webhook": ".json", "email": ".eml"}
SCHEME_URLS = {"SCT": "http://snomed.info/sct", "DCM": "http://dicom.nema.org/resources/ontology/DCM"}
PRIVATE_SYSTEM = "urn:dicom-node:codes"  # the node's private codes (codes.PRIVATE_SCHEME) in FHIR


@dataclass(frozen=True)
class FindingSummary:
    name: str  # the VinDr-CXR class name ("Pneumothorax")
    probability: float  # the box's fused score, as the SR states it
    code: str
    scheme: str  # SCT, DCM or the node's private scheme
    meaning: str  # the scheme's term ("Pneumothorax", "Lung mass")


@dataclass(frozen=True)
class StudySummary:
    """What every message says about a study: the study's :class:`~dicom_node.outputs.verdict.StudyVerdict` (the
    SR's and the captions' too) and where to find the study. The patient fields are PHI: only :meth:`context` with
    ``include_phi`` and the builders given ``include_phi=True`` use them."""

    study_uid: str
    accession_number: str
    verdict: StudyVerdict
    findings: tuple[FindingSummary, ...]  # the verdict's, strongest first, with their codes
    study_date: str  # YYYYMMDD or ""
    console_url: str | None
    created_at: str  # ISO 8601, UTC
    patient_name: str = field(default="", repr=False)
    patient_id: str = field(default="", repr=False)
    patient_birth_date: str = field(default="", repr=False)
    patient_sex: str = field(default="", repr=False)

    @property
    def priority(self) -> str:
        return self.verdict.priority

    @property
    def statement(self) -> str:
        return self.verdict.statement

    def context(self, include_phi: bool) -> dict[str, Any]:
        """The template and webhook context: no patient field unless ``include_phi``."""
        v = self.verdict
        out: dict[str, Any] = {
            "study_instance_uid": self.study_uid,
            "accession_number": self.accession_number,
            "verdict": v.verdict,
            "headline": v.headline,
            "priority": v.priority,
            "priority_reasons": list(v.priority_reasons),
            "statement": v.statement,
            "p_abnormal": None if v.p_abnormal is None else round(v.p_abnormal, 4),
            "findings": [
                {"name": f.name, "probability": round(f.probability, 4), "code": f.code, "scheme": f.scheme}
                for f in self.findings
            ],
            "images": v.images,
            "not_analysable": len(v.unjudged),
            "study_date": self.study_date,
            "console_url": self.console_url,
            "created_at": self.created_at,
            "disclaimer": BANNER_TEXT,
        }
        if include_phi:
            out["patient"] = {
                "name": self.patient_name,
                "id": self.patient_id,
                "birth_date": self.patient_birth_date,
                "sex": self.patient_sex,
            }
        return out


def summarise(
    analysed: list[tuple[Dataset, Prediction]],
    priority: str = ROUTINE,
    reasons: Sequence[str] = (),
    public_url: str | None = None,
) -> StudySummary:
    """The study's summary from its images' headers and predictions (in the order the SR lists them) and its
    priority (``"urgent"`` or ``"routine"``, with the reasons of :mod:`dicom_node.work.priority`)."""
    if not analysed:
        raise EncodingError("no image to summarise")
    verdict = study_verdict([(str(ds.get("SOPInstanceUID", "")), p) for ds, p in analysed], priority, reasons)
    findings = []
    for f in verdict.findings:
        code = C.finding_code(f.class_id)
        findings.append(FindingSummary(f.name, f.probability, code.value, code.scheme_designator, code.meaning))
    header = analysed[0][0]
    study_uid = str(header.StudyInstanceUID)
    console = f"{public_url.rstrip('/')}/studies/{study_uid}" if public_url else None
    return StudySummary(
        study_uid=study_uid,
        accession_number=str(header.get("AccessionNumber", "") or ""),
        verdict=verdict,
        findings=tuple(findings),
        study_date=str(header.get("StudyDate", "") or ""),
        console_url=console,
        created_at=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        patient_name=str(header.get("PatientName", "") or ""),
        patient_id=str(header.get("PatientID", "") or ""),
        patient_birth_date=str(header.get("PatientBirthDate", "") or ""),
        patient_sex=str(header.get("PatientSex", "") or ""),
    )


# ---- HL7 v2.5.1 ORU^R01 ----------------------------------------------------------------------------------------
def _hl7_time(iso: str) -> str:
    return datetime.strptime(iso, "%Y-%m-%dT%H:%M:%SZ").strftime("%Y%m%d%H%M%S")


def hl7_oru(
    s: StudySummary,
    *,
    include_phi: bool,
    sending_application: str,
    sending_facility: str,
    receiving_application: str,
    receiving_facility: str,
    control_id: str | None = None,
) -> bytes:
    """An HL7 v2.5.1 ORU^R01 (ER7, segments ended by CR) for the summary; see the module docstring."""
    msg = hl7.parse("MSH|^~\\&|")

    def segment(name: str) -> hl7.Segment:
        seg = msg.create_segment([msg.create_field([name])])
        msg.append(seg)
        return seg

    def put(seg: hl7.Segment, value: str, field_no: int, component: int | None = None) -> None:
        # every value escaped by the library (|, ^, ~, \, & and non-ASCII characters)
        seg.assign_field(msg.escape(str(value)), field_no, 1 if component else None, component)

    now = _hl7_time(s.created_at)
    control_id = control_id or uuid.uuid4().hex[:20]
    urgent = s.priority == URGENT
    abnormal_flag = {ABNORMAL: "A", NO_ABNORMALITY: "N"}.get(s.verdict.verdict, "")
    msh = msg.segment("MSH")
    for no, value in ((3, sending_application), (4, sending_facility), (5, receiving_application)):
        put(msh, value, no)
    put(msh, receiving_facility, 6)
    put(msh, now, 7)
    for comp, value in ((1, "ORU"), (2, "R01"), (3, "ORU_R01")):
        put(msh, value, 9, comp)
    put(msh, control_id, 10)
    put(msh, "P", 11)
    put(msh, "2.5.1", 12)

    pid = segment("PID")
    put(pid, "1", 1)
    if include_phi:
        put(pid, s.patient_id, 3, 1)
        put(pid, "PI", 3, 5)
        for comp, part in enumerate(s.patient_name.split("^")[:5], 1):  # DICOM PN: family^given^middle^prefix^suffix
            put(pid, part, 5, comp)
        put(pid, s.patient_birth_date, 7)
        put(pid, s.patient_sex, 8)
    else:
        put(pid, "", 3)  # no patient identifiers: the accession number in ORC/OBR names the order

    orc = segment("ORC")
    put(orc, "RE", 1)
    put(orc, s.accession_number, 2)
    put(orc, s.accession_number, 3)
    put(orc, "S" if urgent else "R", 7, 6)  # quantity/timing: priority

    obr = segment("OBR")
    put(obr, "1", 1)
    put(obr, s.accession_number, 2)
    put(obr, s.accession_number, 3)
    for comp, value in ((1, "AI-CXR"), (2, "AI chest X-ray analysis"), (3, "L")):
        put(obr, value, 4, comp)
    put(obr, "S" if urgent else "R", 5)
    put(obr, now, 7)
    put(obr, now, 22)
    put(obr, "RAD", 24)
    put(obr, "P", 25)
    put(obr, "S" if urgent else "R", 27, 6)

    obx_rows: list[tuple[str, tuple[str, str, str], str, str, str]] = [
        ("ST", ("AI-VERDICT", "AI study result", "L"), s.statement, "", abnormal_flag),
        ("ST", ("AI-PRIORITY", "AI triage priority", "L"), s.priority, "", ""),
        ("HD", ("110180", "Study Instance UID", "DCM"), s.study_uid, "", ""),
    ]
    for f in s.findings:
        scheme = "SCT" if f.scheme == "SCT" else ("DCM" if f.scheme == "DCM" else "L")
        obx_rows.append(("NM", (f.code, f.name, scheme), f"{f.probability:.4f}", "1", "A"))
    for n, (vtype, ident, value, units, flag) in enumerate(obx_rows, 1):
        obx = segment("OBX")
        put(obx, str(n), 1)
        put(obx, vtype, 2)
        for comp, part in enumerate(ident, 1):
            put(obx, part, 3, comp)
        put(obx, value, 5)
        if units:
            put(obx, units, 6, 1)
            put(obx, "UCUM", 6, 3)
        put(obx, flag, 8)
        put(obx, "P", 11)
        put(obx, now, 14)
    nte = segment("NTE")
    put(nte, "1", 1)
    put(nte, BANNER_TEXT, 3)
    return str(msg).encode("ascii")


# ---- FHIR R4 transaction Bundle --------------------------------------------------------------------------------
def _coding(code: str, scheme: str, meaning: str) -> dict[str, str]:
    return {"system": SCHEME_URLS.get(scheme, PRIVATE_SYSTEM), "code": code, "display": meaning}


def fhir_bundle(s: StudySummary, *, include_phi: bool) -> bytes:
    """A FHIR R4 transaction Bundle (JSON), validated with fhir.resources; see the module docstring."""
    study_ref = {"type": "ImagingStudy", "identifier": {"system": "urn:dicom:uid", "value": f"urn:oid:{s.study_uid}"}}
    chest = {"coding": [_coding(C.CHEST.value, "SCT", C.CHEST.meaning)], "text": "Chest"}
    observations = []
    for f in s.findings:
        observations.append(
            (
                f"urn:uuid:{uuid.uuid4()}",
                {
                    "resourceType": "Observation",
                    "status": "preliminary",
                    "category": [
                        {
                            "coding": [
                                {
                                    "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                    "code": "imaging",
                                    "display": "Imaging",
                                }
                            ]
                        }
                    ],
                    "code": {"coding": [_coding(f.code, f.scheme, f.meaning)], "text": f.name},
                    "effectiveDateTime": s.created_at,
                    "valueQuantity": {
                        "value": round(f.probability, 4),
                        "unit": "probability",
                        "system": "http://unitsofmeasure.org",
                        "code": "1",
                    },
                    "interpretation": [
                        {
                            "coding": [
                                {
                                    "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation",
                                    "code": "A",
                                    "display": "Abnormal",
                                }
                            ]
                        }
                    ],
                    "bodySite": chest,
                    "derivedFrom": [study_ref],
                    "note": [{"text": BANNER_TEXT}],
                },
            )
        )
    report: dict[str, Any] = {
        "resourceType": "DiagnosticReport",
        "meta": {
            "tag": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/v3-ActPriority",
                    "code": "S" if s.priority == URGENT else "R",
                    "display": "stat" if s.priority == URGENT else "routine",
                }
            ]
        },
        "status": "preliminary",
        "category": [
            {
                "coding": [
                    {"system": "http://loinc.org", "code": "LP29684-5", "display": "Radiology"},
                    {"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "RAD", "display": "Radiology"},
                ]
            }
        ],
        "code": {
            "coding": [{"system": "http://loinc.org", "code": "18748-4", "display": "Diagnostic imaging study"}],
            "text": "AI chest X-ray analysis",
        },
        "issued": s.created_at,
        "imagingStudy": [study_ref],
        "result": [{"reference": full_url} for full_url, _ in observations],
        "conclusion": f"{s.statement} (priority: {s.priority}). {BANNER_TEXT}",
    }
    code = C.verdict_code(s.verdict.verdict)  # Abnormal, No abnormality or Indeterminate, as the SR codes it
    report["conclusionCode"] = [{"coding": [_coding(code.value, code.scheme_designator, code.meaning)]}]
    if s.accession_number:
        report["basedOn"] = [
            {
                "type": "ServiceRequest",
                "identifier": {
                    "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "ACSN"}]},
                    "value": s.accession_number,
                },
            }
        ]
    if include_phi and s.patient_id:
        subject = {"type": "Patient", "identifier": {"value": s.patient_id}, "display": s.patient_name}
        report["subject"] = subject
        for _, obs in observations:
            obs["subject"] = subject
    entries = [
        {
            "fullUrl": f"urn:uuid:{uuid.uuid4()}",
            "resource": report,
            "request": {"method": "POST", "url": "DiagnosticReport"},
        }
    ] + [
        {"fullUrl": full_url, "resource": obs, "request": {"method": "POST", "url": "Observation"}}
        for full_url, obs in observations
    ]
    bundle = {"resourceType": "Bundle", "type": "transaction", "timestamp": s.created_at, "entry": entries}
    validate_bundle(bundle)
    return json.dumps(bundle, indent=1).encode()


def validate_bundle(bundle: dict) -> None:
    """Raises EncodingError unless ``bundle`` is a valid FHIR Bundle (fhir.resources' R4B models)."""
    from fhir.resources.R4B.bundle import Bundle
    from pydantic import ValidationError

    try:
        Bundle.model_validate(bundle)
    except ValidationError as exc:
        raise EncodingError(f"FHIR Bundle failed validation: {exc}") from exc


# ---- webhooks, Teams, Slack, email -------------------------------------------------------------------------------
def webhook_json(s: StudySummary, *, include_phi: bool) -> bytes:
    """The webhook body: ``{"event": "dicom-node.result", ...}`` with :meth:`StudySummary.context`."""
    return json.dumps({"event": "dicom-node.result", "version": 1, **s.context(include_phi)}, indent=1).encode()


def _environment(template: Path | None) -> jinja2.Environment:
    folders = [str(template.parent)] if template is not None else []
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader([*folders, str(TEMPLATES)]),
        undefined=jinja2.StrictUndefined,
        autoescape=False,  # plain text and JSON: JSON templates write every value with |tojson
        keep_trailing_newline=True,
    )


def rendered(name: str, s: StudySummary, *, include_phi: bool, template: Path | None = None) -> str:
    """A shipped template (``name``) or the destination's own ``template``, rendered with the summary."""
    try:
        env = _environment(template)
        return env.get_template(template.name if template is not None else name).render(**s.context(include_phi))
    except jinja2.TemplateError as exc:
        raise EncodingError(f"template {template or name}: {exc}") from exc


def json_template(name: str, s: StudySummary, *, include_phi: bool, template: Path | None = None) -> bytes:
    """A JSON body (Teams, Slack) from a template; the result must parse as JSON."""
    text = rendered(name, s, include_phi=include_phi, template=template)
    try:
        return json.dumps(json.loads(text), indent=1).encode()
    except ValueError as exc:
        raise EncodingError(f"template {template or name} did not render valid JSON: {exc}") from exc


def email_message(
    s: StudySummary,
    *,
    include_phi: bool,
    sender: str,
    recipients: list[str],
    subject: str,
    template: Path | None = None,
) -> bytes:
    """An RFC 5322 message (UTF-8 text, CRLF line ends): the subject and the body from templates."""
    try:
        subject_text = (
            _environment(None).from_string(subject).render(**s.context(include_phi)).strip().replace("\n", " ")
        )
    except jinja2.TemplateError as exc:
        raise EncodingError(f"email subject template: {exc}") from exc
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = ", ".join(recipients)
    msg["Subject"] = subject_text
    msg["Date"] = format_datetime(datetime.now(UTC))
    msg["Message-ID"] = make_msgid(domain="dicom-node.invalid")
    msg.set_content(rendered("email.txt.j2", s, include_phi=include_phi, template=template))
    # CRLF line ends, as SMTP sends them (smtplib sends bytes as they are); headers folded only past 998 characters
    return msg.as_bytes(policy=policy.SMTP.clone(max_line_length=998))


def payload_for(dest: NotificationConfig, s: StudySummary) -> bytes:
    """The payload a notification destination (HL7, FHIR, webhook, email) gets for ``s``."""
    phi = dest.include_phi
    if isinstance(dest, HL7DestinationConfig):
        return hl7_oru(
            s,
            include_phi=phi,
            sending_application=dest.sending_application,
            sending_facility=dest.sending_facility,
            receiving_application=dest.receiving_application,
            receiving_facility=dest.receiving_facility,
        )
    if isinstance(dest, FHIRDestinationConfig):
        return fhir_bundle(s, include_phi=phi)
    if isinstance(dest, WebhookDestinationConfig):
        if dest.format == "json":
            return webhook_json(s, include_phi=phi)
        return json_template(f"{dest.format}.json.j2", s, include_phi=phi, template=dest.template)
    if isinstance(dest, EmailDestinationConfig):
        return email_message(
            s,
            include_phi=phi,
            sender=dest.from_address,
            recipients=list(dest.to),
            subject=dest.subject,
            template=dest.template,
        )
    raise EncodingError(f"no payload for a destination of type {getattr(dest, 'type', '?')!r}")
