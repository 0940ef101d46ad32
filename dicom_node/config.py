"""Typed configuration: ``config.yaml`` validated by pydantic (``extra="forbid"``).

``load_config(path)`` returns a :class:`Config` or raises :class:`ConfigError` with one readable
message naming the offending key. Relative paths in the file are resolved against the file's folder.
Environment overrides exist only for paths and secrets:

- ``DICOM_NODE_STORAGE_ROOT`` overrides ``storage.root``
- ``DICOM_NODE_DATABASE_URL`` overrides ``storage.database_url``
"""

from __future__ import annotations

import ipaddress
import os
import site
import sys
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from dicom_node.errors import ConfigError
from inference.types import FINDING_CLASSES

DEFAULT_CONFIG_NAME = "config.yaml"
OutputKind = Literal["sr", "sc", "gsps"]
DESTINATION_TYPES = ("dicom", "dicomweb", "hl7", "fhir", "webhook", "email")


def safe_name(name: str) -> str:
    """A file name made of an instance's name (letters, digits, ``._-``; anything else becomes ``_``)."""
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name).lstrip(".") or "_"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _ae_title(value: str) -> str:
    if not 1 <= len(value) <= 16 or not value.isascii() or "\\" in value or value.strip() != value:
        raise ValueError(
            f"{value!r} is not a valid AE title (1-16 ASCII characters, no backslash, no leading/trailing spaces)"
        )
    return value


def _http_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"{value!r} is not a URL starting with http:// or https://")
    return value


def _password_hashes(users: dict[str, str]) -> dict[str, str]:
    """Login name -> password hash (`dicom-node hash-password`): each hash must be one the node can check."""
    from dicom_node.passwords import check_hash

    for name, hashed in users.items():
        problem = check_hash(hashed)
        if problem:
            raise ValueError(f"user {name!r}: {problem}")
    return users


class AllowedPeer(_Strict):
    """A calling AE title and the hosts it may call from (like Orthanc's DicomCheckModalityHost)."""

    ae_title: str
    hosts: list[str] = Field(min_length=1)  # IP addresses or networks (10.1.0.0/16)

    _check_ae = field_validator("ae_title")(classmethod(lambda cls, v: _ae_title(v)))

    @field_validator("hosts")
    @classmethod
    def _networks(cls, v: list[str]) -> list[str]:
        for host in v:
            try:
                ipaddress.ip_network(host, strict=False)
            except ValueError:
                raise ValueError(f"{host!r} is not an IP address or network (e.g. 10.0.0.5, 10.1.0.0/16)") from None
        return v


class TLSConfig(_Strict):
    """DICOM TLS (PS3.15 Annex B) listener, beside the plain one on ``node.port``."""

    port: int | None = Field(None, ge=0, le=65535)  # null = no TLS listener (2762 is DICOM TLS's registered port)
    certificate: Path | None = None  # PEM: the node's certificate (chain)
    private_key: Path | None = None  # PEM
    ca_certificates: Path | None = None  # PEM bundle that client certificates must chain to
    require_client_certificate: bool = False  # mutual TLS
    allowed_client_names: list[str] = Field(default_factory=list)  # [] = any client the CA signed; else CN/DNS names
    only: bool = False  # true: no plain listener (node.port is not opened)

    @model_validator(mode="after")
    def _complete(self) -> "TLSConfig":
        if self.port is not None and (self.certificate is None or self.private_key is None):
            raise ValueError("node.tls.port needs node.tls.certificate and node.tls.private_key")
        if self.require_client_certificate and self.ca_certificates is None:
            raise ValueError("node.tls.require_client_certificate needs node.tls.ca_certificates")
        if self.allowed_client_names and not self.require_client_certificate:
            raise ValueError("node.tls.allowed_client_names needs node.tls.require_client_certificate: true")
        if self.only and self.port is None:
            raise ValueError("node.tls.only needs node.tls.port")
        return self


class DestinationTLSConfig(_Strict):
    ca_certificates: Path  # PEM bundle the destination's certificate must chain to
    certificate: Path | None = None  # the node's client certificate, for a destination that asks for one
    private_key: Path | None = None
    server_name: str | None = None  # name to check in the destination's certificate; null = its host


class NodeConfig(_Strict):
    ae_title: str = "DICOM_NODE"
    host: str = "0.0.0.0"
    port: int = Field(11112, ge=0, le=65535)
    allowed_calling_aets: list[str] = Field(default_factory=list)  # [] = any
    allowed_peers: list[AllowedPeer] = Field(default_factory=list)  # [] = any AE from any host
    # This serve instance's name among those sharing one database (each must have its own; null: the host name).
    instance_name: str | None = Field(None, min_length=1, max_length=64)
    max_associations: int = Field(16, ge=1)
    max_connections_per_peer: int = Field(8, ge=1)  # open connections one host (IP) may hold
    max_inflated_mb: int = Field(512, ge=1)  # a deflated data set may inflate to at most this
    acse_timeout_s: float = Field(30, gt=0)
    dimse_timeout_s: float = Field(60, gt=0)
    network_timeout_s: float = Field(120, gt=0)
    max_pdu_bytes: int = Field(0, ge=0)  # 0 = unlimited
    tls: TLSConfig = Field(default_factory=TLSConfig)

    _check_ae = field_validator("ae_title")(classmethod(lambda cls, v: _ae_title(v)))

    @field_validator("allowed_calling_aets")
    @classmethod
    def _check_aets(cls, v: list[str]) -> list[str]:
        return [_ae_title(a) for a in v]


class StorageConfig(_Strict):
    root: Path = Path("./var")
    database_url: str | None = None  # null = SQLite file under root
    min_free_disk_mb: int = Field(1024, ge=0)

    @field_validator("database_url")
    @classmethod
    def _supported_database(cls, value: str | None) -> str | None:
        if value is not None and value.split(":", 1)[0].split("+", 1)[0] not in ("sqlite", "postgresql"):
            raise ValueError("only sqlite:///PATH and postgresql://... (e.g. postgresql+psycopg://) are supported")
        return value

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.root / 'dicom-node.sqlite3').resolve()}"


class RetentionConfig(_Strict):
    keep_days: float = Field(0, ge=0)  # 0 = no age limit
    high_watermark_percent: float = Field(0, ge=0, le=100)  # 0 = no disk rule (e.g. 90 with a low mark of 80)
    low_watermark_percent: float = Field(0, ge=0, le=100)
    check_interval_s: float = Field(300, gt=0)

    @model_validator(mode="after")
    def _watermarks(self) -> "RetentionConfig":
        if self.high_watermark_percent and self.low_watermark_percent >= self.high_watermark_percent:
            raise ValueError("retention.low_watermark_percent must be below high_watermark_percent")
        return self


class StudiesConfig(_Strict):
    stable_after_s: float = Field(10, ge=0)


class SelectionConfig(_Strict):
    """Which received instances are analysed. Everything else is stored and marked skipped."""

    modalities: list[str] = Field(default_factory=lambda: ["CR", "DX"])
    view_positions: list[str] = Field(default_factory=lambda: ["PA", "AP"])
    body_parts: list[str] = Field(
        default_factory=lambda: ["CHEST", "THORAX", "LUNG", "TORAX", "THORAX_AP", "CHEST_AP", "CHEST_PA"]
    )
    # Many modalities leave BodyPartExamined empty: accept a missing body part by default.
    allow_missing_body_part: bool = True
    # A missing ViewPosition is common on older CR: analyse it only when this is true.
    allow_missing_view_position: bool = False
    # Intended use: adults. Younger patients (by Patient's Age, or Birth Date and Study Date) are skipped; an image
    # without either is analysed. null = no age gate.
    min_patient_age_years: float | None = Field(18, ge=0)


def default_model(name: str) -> Path:
    """A model file shipped with dicom-node, wherever it runs from: ``models/`` beside the packages (a source
    checkout or an editable install), else ``<prefix>/share/dicom-node/models`` (where a wheel installs them,
    see ``pyproject.toml``). When neither has it, the first place, so that the error names a real path."""
    candidates = [
        Path(__file__).resolve().parents[1] / "models" / name,
        Path(sys.prefix) / "share" / "dicom-node" / "models" / name,
        Path(site.USER_BASE or "~/.local").expanduser() / "share" / "dicom-node" / "models" / name,  # pip --user
    ]
    return next((c for c in candidates if c.is_file()), candidates[0])


class ModelsConfig(_Strict):
    classifier: Path = Field(default_factory=lambda: default_model("classifier.pt"))  # null = shipped model
    detector: Path = Field(default_factory=lambda: default_model("detector.pt"))
    calibration: Path | None = None  # a site calibration file from `dicom-node calibrate`; null = the model's own
    device: str = "cpu"
    threads: int | None = Field(None, ge=1)  # torch threads per worker; null = torch's default (all cores)
    # torch, or onnxruntime (each model file's export beside it: `dicom-node export-onnx`; a model imported from
    # ONNX always runs in onnxruntime)
    backend: Literal["torch", "onnxruntime"] = "torch"
    batch_images: int = Field(8, ge=1)  # images of one job that go through each network together

    @field_validator("classifier", "detector", mode="before")
    @classmethod
    def _shipped_model(cls, value: Any, info: Any) -> Any:
        return default_model(f"{info.field_name}.pt") if value is None else value


class FusionConfig(_Strict):
    mode: Literal["gate", "soft"] = "soft"
    abnormal_threshold: float = Field(0.5, ge=0, le=1)  # gate: detect only when p_abnormal >= this
    min_score: float = Field(0.25, ge=0, le=1)  # findings below this fused score are dropped
    detector_conf: float = Field(0.05, ge=0, le=1)  # raw detector confidence floor
    max_findings: int = Field(20, ge=1)
    same_class_iou: float = Field(0.5, ge=0, le=1)  # same-class boxes overlapping more: one finding, one box
    same_class_containment: float = Field(0.8, ge=0, le=1)  # ... or nested (share of the smaller box)


class InferenceConfig(_Strict):
    models: ModelsConfig = Field(default_factory=ModelsConfig)
    fusion: FusionConfig = Field(default_factory=FusionConfig)


class WorkersConfig(_Strict):
    count: int = Field(1, ge=0)  # worker processes started by `serve` (0 = none, run `dicom-node worker`)
    poll_interval_s: float = Field(0.1, gt=0)
    job_lease_s: float = Field(
        60, gt=0
    )  # renewed while a worker works; a job whose worker died is taken over after this
    start_timeout_s: float = Field(300, gt=0)  # serve waits this long for its workers to load their models
    # queued studies a worker takes at once, their images batched through the networks (bounded by
    # inference.models.batch_images): more throughput on a GPU; 1 = the first result as soon as possible
    jobs_per_batch: int = Field(1, ge=1)


class OutputsConfig(_Strict):
    institution_name: str | None = None
    series_number_sr: int = 9001
    series_number_sc: int = 9002
    series_number_gsps: int = 9003


class DestinationConfig(_Strict):
    """A DICOM peer (a PACS): the result objects by C-STORE. ``type: dicom`` is the default (older configs name no
    type)."""

    type: Literal["dicom"] = "dicom"
    name: str
    ae_title: str
    host: str
    port: int = Field(ge=1, le=65535)
    outputs: list[OutputKind] = Field(default_factory=lambda: list[OutputKind](["sr", "sc", "gsps"]))
    tls: DestinationTLSConfig | None = None  # null = plain DICOM
    # silent: results are made, kept and shown in the console, never sent (the go-live path's first phase);
    # live: sent. Silent is the default: a site turns a destination live after validating the models on its own
    # studies (README, "Go live"). Results made while silent stay held when it goes live (`dicom-node release`).
    mode: Literal["live", "silent"] = "silent"

    _check_ae = field_validator("ae_title")(classmethod(lambda cls, v: _ae_title(v)))


class DicomWebDestinationConfig(_Strict):
    """A DICOMweb archive: the result objects by STOW-RS, all of a study's due results in one request. It takes
    the same outputs as a DICOM destination; auth is HTTP Basic, a bearer token or a client certificate."""

    type: Literal["dicomweb"]
    name: str
    url: str  # the DICOMweb root, e.g. https://pacs.example.org/dicom-web (the node POSTs to {url}/studies)
    username: str | None = None  # HTTP Basic, with password or, better, ...
    password: str | None = None
    password_env: str | None = None  # ... the environment variable that holds it
    token: str | None = None  # bearer token; or, better, ...
    token_env: str | None = None  # ... the environment variable that holds it
    certificate: Path | None = None  # the node's client certificate (PEM), for an archive that asks for one
    private_key: Path | None = None
    ca_certificates: Path | None = None  # PEM bundle for an https:// archive; null = the system's
    outputs: list[OutputKind] = Field(default_factory=lambda: list[OutputKind](["sr", "sc", "gsps"]))
    mode: Literal["live", "silent"] = "silent"  # as for a DICOM destination
    timeout_s: float = Field(60, gt=0)  # connecting, and then waiting for the answer to one request

    _check_url = field_validator("url")(classmethod(lambda cls, v: _http_url(v).rstrip("/")))

    @model_validator(mode="after")
    def _auth(self) -> "DicomWebDestinationConfig":
        if self.username and (self.token or self.token_env):
            raise ValueError("give username (HTTP Basic) or token/token_env (bearer), not both")
        if (self.password or self.password_env) and not self.username:
            raise ValueError("password/password_env needs a username")
        if (self.certificate is None) != (self.private_key is None):
            raise ValueError("certificate and private_key go together")
        return self

    def secret_password(self) -> str | None:
        return secret(self.password, self.password_env)

    def secret_token(self) -> str | None:
        return secret(self.token, self.token_env)


ResultDestination = DestinationConfig | DicomWebDestinationConfig  # the destinations of the DICOM result objects


def secret(value: str | None, env: str | None) -> str | None:
    """A secret from the config (``value``) or, read when it is used, the environment variable named ``env``."""
    if value:
        return value
    return os.environ.get(env) if env else None


class _Notification(_Strict):
    """What every notification destination (HL7, FHIR, webhook, email) has: a message per study, made when the
    study is analysed, kept in the outbox and sent like the DICOM results (retried, failed visibly, audited)."""

    name: str
    mode: Literal["live", "silent"] = "silent"  # as for a DICOM destination
    when: Literal["urgent", "always"] = "urgent"  # urgent: only studies the priority rules make urgent
    # Patient name, ID, birth date and sex in the message. Off: the accession number, the Study UID, the verdict,
    # the priority, the findings and the console link only. An HL7 or FHIR destination feeding a RIS needs it on
    # (a RIS files results by patient identifiers).
    include_phi: bool = False
    timeout_s: float = Field(30, gt=0)  # connecting, and then waiting for the answer


class HL7DestinationConfig(_Notification):
    """HL7 v2.5.1 ORU^R01 over MLLP (optionally TLS) to a RIS or worklist. The ACK decides: AA delivered, AE
    retried, AR failed."""

    type: Literal["hl7"]
    host: str
    port: int = Field(ge=1, le=65535)
    tls: DestinationTLSConfig | None = None  # null = plain MLLP
    sending_application: str = "DICOM_NODE"  # MSH-3
    sending_facility: str = ""  # MSH-4
    receiving_application: str = ""  # MSH-5
    receiving_facility: str = ""  # MSH-6


class FHIRDestinationConfig(_Notification):
    """A FHIR R4 server: a transaction Bundle (DiagnosticReport and Observations) POSTed to its base URL."""

    type: Literal["fhir"]
    url: str  # the server's base URL, e.g. https://fhir.example.org/r4
    token: str | None = None  # bearer token; or, better, ...
    token_env: str | None = None  # ... the environment variable that holds it (e.g. RIS_TOKEN)
    tls: DestinationTLSConfig | None = None  # https: null = the system's certificate authorities

    _check_url = field_validator("url")(classmethod(lambda cls, v: _http_url(v)))


class WebhookDestinationConfig(_Notification):
    """An HTTP POST: signed JSON (format json), or a Microsoft Teams or Slack incoming-webhook message."""

    type: Literal["webhook"]
    url: str
    format: Literal["json", "teams", "slack"] = "json"
    hmac_key: str | None = None  # HMAC-SHA256 of the body in X-Dicom-Node-Signature-256 (README); or ...
    hmac_key_env: str | None = None  # ... the environment variable that holds the key
    template: Path | None = None  # teams/slack: a Jinja2 template of your own (the shipped ones show the context)
    tls: DestinationTLSConfig | None = None  # https: null = the system's certificate authorities

    _check_url = field_validator("url")(classmethod(lambda cls, v: _http_url(v)))

    @model_validator(mode="after")
    def _template_needs_format(self) -> "WebhookDestinationConfig":
        if self.template is not None and self.format == "json":
            raise ValueError("template is for format teams or slack (format json is the node's own document)")
        return self


class EmailDestinationConfig(_Notification):
    """An email over SMTP (smtplib), its body from a Jinja2 template."""

    type: Literal["email"]
    host: str
    port: int = Field(25, ge=1, le=65535)
    security: Literal["none", "starttls", "tls"] = "none"  # starttls: upgrade on the port; tls: TLS from the start
    tls: DestinationTLSConfig | None = None  # starttls/tls: null = the system's certificate authorities
    username: str | None = None  # SMTP AUTH, with password or password_env
    password: str | None = None
    password_env: str | None = None
    from_address: str
    to: list[str] = Field(min_length=1)
    subject: str = (
        "{% if priority == 'urgent' %}URGENT: {% endif %}AI chest X-ray result: {{ headline }}"
        "{% if accession_number %} (accession {{ accession_number }}){% endif %}"
    )  # a Jinja2 template
    template: Path | None = None  # the body: a Jinja2 template of your own (the shipped email.txt.j2 shows it)


NotificationConfig = HL7DestinationConfig | FHIRDestinationConfig | WebhookDestinationConfig | EmailDestinationConfig


def _destination_type(value: Any) -> str:
    if isinstance(value, dict):
        return str(value.get("type", "dicom"))
    return str(getattr(value, "type", "dicom"))


AnyDestination = Annotated[
    Annotated[DestinationConfig, Tag("dicom")]
    | Annotated[DicomWebDestinationConfig, Tag("dicomweb")]
    | Annotated[HL7DestinationConfig, Tag("hl7")]
    | Annotated[FHIRDestinationConfig, Tag("fhir")]
    | Annotated[WebhookDestinationConfig, Tag("webhook")]
    | Annotated[EmailDestinationConfig, Tag("email")],
    Discriminator(
        _destination_type,
        custom_error_type="destination_type",
        custom_error_message="type must be dicom (the default), dicomweb, hl7, fhir, webhook or email",
    ),
]


class DeliveryConfig(_Strict):
    backoff_initial_s: float = Field(5, gt=0)
    backoff_max_s: float = Field(600, gt=0)
    max_attempts: int = Field(50, ge=1)  # transient failures after this many tries -> failed
    connect_timeout_s: float = Field(10, gt=0)
    dimse_timeout_s: float = Field(60, gt=0)


class WebConfig(_Strict):
    enabled: bool = True
    host: str = "127.0.0.1"  # the console, /healthz, /readyz, /metrics; 0.0.0.0 to reach it from elsewhere
    port: int = Field(8480, ge=0, le=65535)
    # Who may log in to the console: login name -> password hash (`dicom-node hash-password`). Also from the
    # environment: DICOM_NODE_WEB_USERS="name:hash,name:hash" (added to these). None: the console shows how
    # to add one and nothing else; /healthz, /readyz and /metrics never need a login.
    users: dict[str, str] = Field(default_factory=dict)
    session_hours: float = Field(8, gt=0)  # a login lasts this long
    secure_cookies: bool = False  # true when users reach the console over HTTPS (a reverse proxy in front)
    max_upload_mb: float = Field(200, gt=0)  # the analyse page's upload limit (all files of one upload)
    page_size: int = Field(50, ge=1, le=1000)  # studies per page
    # The console's address as users reach it (e.g. https://ai-node.hospital.org): messages link to a study's page
    # (<public_url>/studies/<Study UID>). null = messages carry no link.
    public_url: str | None = None

    @field_validator("public_url")
    @classmethod
    def _check_public_url(cls, v: str | None) -> str | None:
        return None if v is None else _http_url(v)

    _check_users = field_validator("users")(classmethod(lambda cls, v: _password_hashes(v)))

    def all_users(self) -> dict[str, str]:
        """The configured users plus DICOM_NODE_WEB_USERS."""
        from dicom_node.passwords import parse_users

        try:
            return {**self.users, **parse_users(os.environ.get("DICOM_NODE_WEB_USERS", ""))}
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc


MIN_STOW_TOKEN = 16  # characters of a STOW-RS bearer token, at least


def _parse_tokens(text: str) -> list[str]:
    return [t for t in (e.strip() for e in text.split(",")) if t]


class DicomWebConfig(_Strict):
    """STOW-RS ingest on the web server (``POST /dicom-web/studies``): off unless enabled, and never anonymous."""

    enabled: bool = False
    # Bearer tokens (Authorization: Bearer ...), MIN_STOW_TOKEN+ characters; also DICOM_NODE_STOW_TOKENS="t1,t2".
    tokens: list[str] = Field(default_factory=list)
    # HTTP Basic users: name -> password hash (`dicom-node hash-password`); also DICOM_NODE_STOW_USERS="name:hash".
    users: dict[str, str] = Field(default_factory=dict)
    max_request_mb: float = Field(2048, gt=0)  # a larger request body is refused (413)
    read_timeout_s: float = Field(60, gt=0)  # a body that stalls this long is cut off (nothing of it stored)

    @field_validator("tokens")
    @classmethod
    def _check_tokens(cls, v: list[str]) -> list[str]:
        if any(len(t) < MIN_STOW_TOKEN for t in v):
            raise ValueError(f"a bearer token needs at least {MIN_STOW_TOKEN} characters")
        return v

    _check_users = field_validator("users")(classmethod(lambda cls, v: _password_hashes(v)))

    def all_tokens(self) -> list[str]:
        """The configured tokens plus DICOM_NODE_STOW_TOKENS."""
        env = _parse_tokens(os.environ.get("DICOM_NODE_STOW_TOKENS", ""))
        if any(len(t) < MIN_STOW_TOKEN for t in env):
            raise ConfigError(f"DICOM_NODE_STOW_TOKENS: a bearer token needs at least {MIN_STOW_TOKEN} characters")
        return [*self.tokens, *env]

    def all_users(self) -> dict[str, str]:
        """The configured users plus DICOM_NODE_STOW_USERS ("name:hash,name:hash")."""
        from dicom_node.passwords import parse_users

        try:
            return {**self.users, **parse_users(os.environ.get("DICOM_NODE_STOW_USERS", ""))}
        except ValueError as exc:
            raise ConfigError(str(exc).replace("DICOM_NODE_WEB_USERS", "DICOM_NODE_STOW_USERS")) from exc


class DicomWebSourceConfig(_Strict):
    """A DICOMweb archive a backfill searches (QIDO-RS) and retrieves from (WADO-RS)."""

    dicomweb: str  # the service's base URL, e.g. https://pacs.example.org/dicom-web
    username: str | None = None  # HTTP Basic
    password: str | None = None  # prefer DICOM_NODE_BACKFILL_PASSWORD
    token: str | None = None  # bearer token; prefer DICOM_NODE_BACKFILL_TOKEN
    ca_certificates: Path | None = None  # PEM bundle for an https:// archive; null = the system's
    timeout_s: float = Field(60, gt=0)  # one HTTP request (connect or read) is given up after this

    @field_validator("dicomweb")
    @classmethod
    def _url(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError("backfill.source.dicomweb is an http:// or https:// URL (the DICOMweb base)")
        return v.rstrip("/")

    def secret_password(self) -> str | None:
        return os.environ.get("DICOM_NODE_BACKFILL_PASSWORD") or self.password

    def secret_token(self) -> str | None:
        return os.environ.get("DICOM_NODE_BACKFILL_TOKEN") or self.token

    def describe(self) -> str:
        return self.dicomweb


class BackfillSourceConfig(_Strict):
    """The PACS a backfill queries (C-FIND) and retrieves from (C-MOVE)."""

    ae_title: str
    host: str
    port: int = Field(ge=1, le=65535)
    tls: DestinationTLSConfig | None = None  # null = plain DICOM

    _check_ae = field_validator("ae_title")(classmethod(lambda cls, v: _ae_title(v)))

    def describe(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


def parse_window(value: str) -> tuple[int, int]:
    """``"HH:MM-HH:MM"`` -> (start, end) in minutes after midnight; the window may wrap midnight (22:00-06:00)."""
    try:
        start, end = value.split("-")
        minutes = []
        for part in (start, end):
            hh, mm = part.strip().split(":")
            if not (hh.isdigit() and mm.isdigit() and len(mm) == 2 and int(hh) < 24 and int(mm) < 60):
                raise ValueError
            minutes.append(int(hh) * 60 + int(mm))
    except ValueError:
        raise ValueError(f"{value!r} is not a time window HH:MM-HH:MM (e.g. 22:00-06:00)") from None
    if minutes[0] == minutes[1]:
        raise ValueError(f"{value!r}: the window's start and end are the same")
    return minutes[0], minutes[1]


class BackfillConfig(_Strict):
    """``dicom-node backfill``: pulling a site's past studies from its PACS, bounded so that it is never flooded."""

    # a PACS over DIMSE {ae_title, host, port}, or a DICOMweb archive {dicomweb: URL, ...}; null = no PACS to pull
    # from (backfill refuses to run)
    source: BackfillSourceConfig | DicomWebSourceConfig | None = None
    move_destination: str | None = None  # the AE title the PACS knows this node by; null = node.ae_title
    max_concurrent_moves: int = Field(1, ge=1, le=16)
    studies_per_hour: int = Field(120, ge=0)  # C-MOVEs started per hour; 0 = unbounded
    window: str | None = None  # e.g. "22:00-06:00" in the node's local time; null = any time
    retry_initial_s: float = Field(30, gt=0)  # a failed search or move is retried after this, doubling ...
    retry_max_s: float = Field(1800, gt=0)  # ... up to this
    max_attempts: int = Field(20, ge=1)  # a study that failed this many times is given up (failed)
    move_timeout_s: float = Field(600, gt=0)  # one study's C-MOVE is aborted (and retried) after this
    check_interval_s: float = Field(1, gt=0)  # how often serve looks for searches and moves to start

    @field_validator("move_destination")
    @classmethod
    def _check_destination(cls, v: str | None) -> str | None:
        return None if v is None else _ae_title(v)

    @field_validator("window")
    @classmethod
    def _check_window(cls, v: str | None) -> str | None:
        if v is not None:
            parse_window(v)
        return v


class DriftConfig(_Strict):
    """Drift watching of live traffic against the latest site validation (``/metrics``, the console's Drift page;
    the rule is :func:`inference.drift.drift_status`'s). The defaults were chosen by measurement (README)."""

    window_days: float = Field(7, gt=0)  # the rolling current window
    min_studies: int = Field(30, ge=1)  # a device with fewer studies in the window gets no verdict
    psi_alert: float = Field(0.25, gt=0)  # PSI above this alerts
    flag_ratio_alert: tuple[float, float] = (0.5, 2.0)  # flag rate / validation's outside [low, high] alerts
    bins: int = Field(5, ge=2, le=20)  # reference-quantile bins of the PSI
    min_reference: int = Field(30, ge=1)  # a device with fewer validated cases is compared with all of them
    weeks_shown: int = Field(12, ge=1)  # weeks on the Drift page
    cache_s: float = Field(30, ge=0)  # /metrics recomputes at most this often

    @field_validator("flag_ratio_alert")
    @classmethod
    def _range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 <= v[0] < 1 < v[1]:
            raise ValueError("flag_ratio_alert is [low, high] with 0 <= low < 1 < high, e.g. [0.5, 2.0]")
        return v


class PriorityConfig(_Strict):
    """Triage (:mod:`dicom_node.work.priority`): which studies are urgent. Urgent studies are analysed first,
    their results delivered first, and the outputs and the console flag them; every other study is routine."""

    # a finding (a name of inference.types.FINDING_CLASSES) at or above its score floor makes the study urgent
    findings: dict[str, float] = Field(default_factory=lambda: {"Pneumothorax": 0.5, "Pleural effusion": 0.6})
    p_abnormal: float | None = Field(None, ge=0, le=1)  # the study's P(abnormal) at or above this; null = off
    # the sender's own priority counts: C-STORE Priority HIGH, Requested Procedure Priority STAT (read at ingest)
    sender_request: bool = True

    @field_validator("findings")
    @classmethod
    def _known_findings(cls, v: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(v) - set(FINDING_CLASSES))
        if unknown:
            raise ValueError(f"unknown finding {unknown[0]!r}; the findings are: {', '.join(FINDING_CLASSES)}")
        outside = sorted(k for k, floor in v.items() if not 0 <= floor <= 1)
        if outside:
            raise ValueError(f"the score floor of {outside[0]!r} must be between 0 and 1")
        return v


class LoggingConfig(_Strict):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    audit_file: Path | None = None  # the audit trail (JSON lines); null = <storage.root>/audit.jsonl
    audit_max_mb: float = Field(10, gt=0)  # rotated beyond this size ...
    audit_backups: int = Field(5, ge=0)  # ... keeping this many old files

    def audit_path(self, storage_root: Path, instance: str | None = None) -> Path:
        """``audit_file``, or ``audit.jsonl`` in the storage root; ``audit-<instance>.jsonl`` when the instance is
        named (``node.instance_name``): instances sharing a spool each append to and rotate a file of their own."""
        if self.audit_file is not None:
            return self.audit_file
        return storage_root / (f"audit-{safe_name(instance)}.jsonl" if instance else "audit.jsonl")


class Config(_Strict):
    node: NodeConfig = Field(default_factory=NodeConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    retention: RetentionConfig = Field(default_factory=RetentionConfig)
    studies: StudiesConfig = Field(default_factory=StudiesConfig)
    selection: SelectionConfig = Field(default_factory=SelectionConfig)
    inference: InferenceConfig = Field(default_factory=InferenceConfig)
    workers: WorkersConfig = Field(default_factory=WorkersConfig)
    outputs: OutputsConfig = Field(default_factory=OutputsConfig)
    destinations: list[AnyDestination] = Field(default_factory=list)
    delivery: DeliveryConfig = Field(default_factory=DeliveryConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    web: WebConfig = Field(default_factory=WebConfig)
    backfill: BackfillConfig = Field(default_factory=BackfillConfig)
    drift: DriftConfig = Field(default_factory=DriftConfig)
    dicomweb: DicomWebConfig = Field(default_factory=DicomWebConfig)
    priority: PriorityConfig = Field(default_factory=PriorityConfig)

    @property
    def dicom_destinations(self) -> list[DestinationConfig]:
        """The DICOM peers (``type: dicom``, the default)."""
        return [d for d in self.destinations if isinstance(d, DestinationConfig)]

    @property
    def result_destinations(self) -> list[ResultDestination]:
        """The destinations of the DICOM result objects (SR, SC, GSPS): DICOM peers and DICOMweb archives."""
        return [d for d in self.destinations if isinstance(d, DestinationConfig | DicomWebDestinationConfig)]

    @property
    def notification_destinations(self) -> list[NotificationConfig]:
        """HL7, FHIR, webhook and email destinations."""
        return [d for d in self.destinations if not isinstance(d, DestinationConfig | DicomWebDestinationConfig)]

    @model_validator(mode="after")
    def _unique_destinations(self) -> "Config":
        names = [d.name for d in self.destinations]
        dupes = {n for n in names if names.count(n) > 1}
        if dupes:
            raise ValueError(f"destination names must be unique; repeated: {sorted(dupes)}")
        return self


def _resolve_paths(cfg: Config, base: Path) -> Config:
    def fix(p: Path) -> Path:
        return p if p.is_absolute() else (base / p).resolve()

    cfg.storage.root = fix(Path(os.environ.get("DICOM_NODE_STORAGE_ROOT", cfg.storage.root)))
    if os.environ.get("DICOM_NODE_DATABASE_URL"):
        cfg.storage.database_url = os.environ["DICOM_NODE_DATABASE_URL"]
    cfg.inference.models.classifier = fix(cfg.inference.models.classifier)
    cfg.inference.models.detector = fix(cfg.inference.models.detector)
    if cfg.inference.models.calibration is not None:
        cfg.inference.models.calibration = fix(cfg.inference.models.calibration)
    if cfg.logging.audit_file is not None:
        cfg.logging.audit_file = fix(cfg.logging.audit_file)
    tls = cfg.node.tls
    for name in ("certificate", "private_key", "ca_certificates"):
        if getattr(tls, name) is not None:
            setattr(tls, name, fix(getattr(tls, name)))
    for dest in cfg.destinations:
        if isinstance(dest, WebhookDestinationConfig | EmailDestinationConfig) and dest.template is not None:
            dest.template = fix(dest.template)
        if isinstance(dest, DicomWebDestinationConfig):
            for name in ("certificate", "private_key", "ca_certificates"):
                if getattr(dest, name) is not None:
                    setattr(dest, name, fix(getattr(dest, name)))
        elif dest.tls is not None:
            for name in ("certificate", "private_key", "ca_certificates"):
                if getattr(dest.tls, name) is not None:
                    setattr(dest.tls, name, fix(getattr(dest.tls, name)))
    source = cfg.backfill.source
    if isinstance(source, DicomWebSourceConfig) and source.ca_certificates is not None:
        source.ca_certificates = fix(source.ca_certificates)
    source_tls = source.tls if isinstance(source, BackfillSourceConfig) else None
    if source_tls is not None:
        for name in ("certificate", "private_key", "ca_certificates"):
            if getattr(source_tls, name) is not None:
                setattr(source_tls, name, fix(getattr(source_tls, name)))
    return cfg


def _format_error(exc: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid configuration"]
    for err in exc.errors():
        loc = list(err["loc"])
        if len(loc) > 2 and loc[0] == "destinations" and loc[2] in DESTINATION_TYPES:
            del loc[
                2
            ]  # the destination's type, which pydantic names in the path: destinations.0.port, not .0.dicom.port
        key = ".".join(str(p) for p in loc) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see config.yaml for the documented keys)"
        lines.append(f"  {key}: {msg}")
    return "\n".join(lines)


def parse_config(data: dict | None, base: Path, source: str = "config") -> Config:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections (node, storage, ...)")
    try:
        cfg = Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_error(exc, source)) from exc
    return _resolve_paths(cfg, base)


def load_config(path: str | os.PathLike | None = None) -> Config:
    """Load and validate a config file; ``None`` means ./config.yaml if present, else defaults."""
    if path is None:
        candidate = Path(DEFAULT_CONFIG_NAME)
        if not candidate.exists():
            return parse_config({}, Path.cwd(), "defaults")
        path = candidate
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read configuration file ({exc.strerror})") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
    return parse_config(data, path.resolve().parent, str(path))
