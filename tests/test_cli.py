"""The command line as an operator meets it: exit codes from the one table in dicom_node.cli, one readable
line for every failure the node reports on purpose, a traceback only for a bug; the shipped models found from
any working directory; the node's commands never load training code or torch."""

from __future__ import annotations

import subprocess
import sys

import pytest

from dicom_node.cli import EXIT_INTERNAL_ERROR, exit_code
from dicom_node.errors import ConfigError, DicomNodeError, PixelDataError
from inference.errors import ModelError
from storage.errors import DatabaseError, UnknownStudyError


def dicom_node(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dicom_node", *args], capture_output=True, text=True, cwd=cwd, timeout=300
    )


def test_exit_code_table_covers_the_whole_tree():
    assert exit_code(ConfigError("x")) == 2
    for err in (PixelDataError("x"), ModelError("x"), DatabaseError("x"), UnknownStudyError("x")):
        assert isinstance(err, DicomNodeError) and exit_code(err) == 1
    assert exit_code(KeyError("x")) == EXIT_INTERNAL_ERROR  # not ours: a bug, never relabelled


def test_analyze_with_a_missing_model_file_says_which_and_exits_1(tmp_path, samples_dir):
    cfg = tmp_path / "config.yaml"
    cfg.write_text("inference:\n  models:\n    classifier: nowhere/classifier.pt\n")
    r = dicom_node("analyze", str(samples_dir / "fodicom_CR-MONO1-10-chest.dcm"), "--config", str(cfg))
    assert r.returncode == 1, r.stderr
    assert "nowhere/classifier.pt" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow  # analyze loads the shipped models
def test_analyze_outside_the_repository_uses_the_shipped_models(tmp_path, samples_dir):
    r = dicom_node("analyze", str(samples_dir / "fodicom_CR-MONO1-10-chest.dcm"), "-o", "out", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out" / "fodicom_CR-MONO1-10-chest.json").is_file()
    assert "P(abnormal)" in r.stdout


def test_reanalyze_of_an_unknown_study_is_a_clear_error(tmp_path):
    cfg = tmp_path / "config.yaml"
    cfg.write_text(f"storage:\n  root: {tmp_path / 'var'}\n")
    r = dicom_node("reanalyze", "1.2.3.4.5", "--config", str(cfg))
    # not held here, and nowhere configured to fetch it from (reanalyze fetches from backfill.source when set)
    assert r.returncode == 2 and "not held here" in r.stderr and "backfill.source" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_unreadable_database_is_a_storage_error_not_a_traceback(tmp_path):
    (tmp_path / "var").mkdir()
    (tmp_path / "var" / "dicom-node.sqlite3").write_bytes(b"this is not a database" * 100)
    cfg = tmp_path / "config.yaml"
    cfg.write_text(f"storage:\n  root: {tmp_path / 'var'}\n")
    r = dicom_node("status", "--config", str(cfg))
    assert r.returncode == 1, r.stderr
    assert "database failure" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("command", ["train", "evaluate"])
def test_training_commands_are_listed_and_have_their_own_help(command):
    assert command in dicom_node("--help").stdout
    r = dicom_node(command, "--help")
    assert r.returncode == 0 and "--layout" in r.stdout + dicom_node("train", "classifier", "--help").stdout


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (("train", "classifier", "--layout", "folder"), "--layout folder needs --csv and --images"),
        (("evaluate", "--classifier", "c.pt", "--detector", "d.pt", "--split", "a,b,c"), "--split must be three"),
        (("export-onnx", "nowhere.pt", "--reduce-range"), "are for --int8 exports"),
        (("train", "detector", "--epochs", "many"), "invalid int value"),
    ],
)
def test_training_commands_with_bad_options_exit_2_as_the_node_commands_do(args, says):
    r = dicom_node(*args)
    assert r.returncode == 2 and says in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_the_node_imports_neither_torch_nor_training_code():
    code = (
        "import sys, dicom_node.app, dicom_node.cli;"
        "dicom_node.cli.build_parser().parse_args(['status']);"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'ultralytics', 'timm')"
        " or m.startswith(('inference.training', 'dicom_node.training')));"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def test_hash_password_makes_a_hash_the_console_accepts(tmp_path):
    from dicom_node.passwords import verify_password

    r = subprocess.run(
        [sys.executable, "-m", "dicom_node", "hash-password"],
        input="a long enough password\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    hashed = r.stdout.strip()
    assert hashed.startswith("scrypt$") and "a long enough password" not in hashed
    assert verify_password("a long enough password", hashed) and not verify_password("another password", hashed)
    short = subprocess.run(
        [sys.executable, "-m", "dicom_node", "hash-password"], input="short\n", capture_output=True, text=True
    )
    assert short.returncode == 2 and "at least 8 characters" in short.stderr

    # a password pasted where the hash belongs is refused with the key's name
    (tmp_path / "config.yaml").write_text("web:\n  users:\n    alice: my-plain-password\n")
    r = dicom_node("status", "--config", str(tmp_path / "config.yaml"))
    assert r.returncode == 2 and "web.users" in r.stderr and "hash-password" in r.stderr, r.stderr
