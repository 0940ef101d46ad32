"""The one exception tree: every error the project raises on purpose derives from DicomNodeError, the tree
drawn in dicom_node/errors.py names them all, each maps to one C-STORE status, and the traceback a failed job
or a bug leaves in the log carries no third-party message text (which could quote patient data)."""

from __future__ import annotations

import inspect
import re

import pytest

import dicom_node.errors
import inference.errors
import storage.errors
from dicom_node.errors import DicomNodeError, MissingUIDError, UndecodableInstanceError
from dicom_node.ingest.statuses import ALL, INTERNAL_ERROR, status_for
from dicom_node.logs import safe_traceback
from storage.errors import DatabaseError, DiskFullError, StorageError


def project_errors() -> list[type[BaseException]]:
    return [
        cls
        for module in (dicom_node.errors, storage.errors, inference.errors)
        for _, cls in inspect.getmembers(module, inspect.isclass)
        if issubclass(cls, BaseException) and cls.__module__ == module.__name__
    ]


def test_every_project_error_is_in_the_one_tree_and_drawn_in_its_docstring():
    drawn = dicom_node.errors.__doc__
    assert len(project_errors()) >= 17
    for cls in project_errors():
        assert issubclass(cls, DicomNodeError), cls
        assert re.search(rf"^\s*(?:[│├└─ ]*)\b{cls.__name__}\b", drawn, flags=re.M), f"{cls.__name__} is not drawn"


@pytest.mark.parametrize(
    "exc,code,comment",
    [
        (DiskFullError("below watermark"), 0xA700, "out of disk space"),
        (
            DatabaseError("database failure in add_instance: OperationalError: disk I/O error"),
            0xA700,
            "storage failure",
        ),
        (StorageError("cannot read the received file"), 0xA700, "storage failure"),
        (MissingUIDError("missing StudyInstanceUID"), 0xA900, "missing StudyInstanceUID"),
        (UndecodableInstanceError("dataset cannot be decoded (ValueError)"), 0xC210, "dataset cannot be decoded"),
        (KeyError("a bug"), 0xC211, "internal error"),
    ],
)
def test_each_error_has_one_cstore_status(exc, code, comment):
    status = status_for(exc)
    assert status in ALL and status.code == code
    # the handler sends our own message for a refused instance, a fixed comment for everything else
    sent = status.dataset(str(exc) if isinstance(exc, dicom_node.errors.InstanceRejected) else None)
    assert sent.Status == code and sent.ErrorComment.startswith(comment)
    if status is INTERNAL_ERROR:
        assert "a bug" not in sent.ErrorComment


def test_safe_traceback_keeps_frames_and_our_messages_but_withholds_foreign_text():
    def parse(value: str) -> None:
        raise ValueError(f"invalid value for PN: {value!r}")

    name = "^".join(["DOE", "JANE"])  # a value from a data set, not text of the source
    try:
        try:
            parse(name)
        except ValueError as exc:
            raise UndecodableInstanceError("dataset cannot be decoded (ValueError)") from exc
    except DicomNodeError as exc:
        text = safe_traceback(exc)
    assert "DOE^JANE" not in text
    assert "UndecodableInstanceError: dataset cannot be decoded (ValueError)" in text
    assert "builtins.ValueError (message withheld" in text
    assert "in parse" in text and "test_errors.py" in text  # where it happened
