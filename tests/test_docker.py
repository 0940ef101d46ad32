"""The Docker image (Dockerfile) and the single-host compose file (docs/docker/compose.yml).

The image is built on the base that tests/support/docker_base.sh makes from Debian packages (no registry needed),
then run with the host's network, every port on 127.0.0.1: ``check-config`` passes on the image's own
configuration; ``serve`` becomes ready; a real radiograph goes in by C-STORE from dcmtk and its SR comes back to a
dcmtk storescp on the host, the node's live destination; ``docker stop`` ends the node cleanly.

No docker daemon here: skipped, unless DICOM_NODE_REQUIRE_DOCKER=1 (CI), which makes it a failure. Torch comes from
PyTorch's CPU-only index, the Dockerfile's default, when this machine reaches it, else from PyPI (the CUDA build:
several GB more, same behaviour on the CPU); DICOM_NODE_DOCKER_TORCH_INDEX_URL sets it (empty: PyPI).
The image keeps its tag (dicom-node:test) so that docker's layer cache makes the next build quick; the containers
and their volumes are removed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pydicom
import pytest
import yaml

from support.dcmtk import DcmtkStoreSCP
from support.node import LISTENING, WEB, wait_for
from support.real_studies import make_real_studies

REPO = Path(__file__).resolve().parents[1]
IMAGE = "dicom-node:test"
COMPOSE = REPO / "docs" / "docker" / "compose.yml"
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
REQUIRE = os.environ.get("DICOM_NODE_REQUIRE_DOCKER") == "1"


def _unavailable(reason: str) -> None:
    if REQUIRE:
        pytest.fail(f"{reason} (DICOM_NODE_REQUIRE_DOCKER=1: docker is required)")
    pytest.skip(reason)


def _docker_ready() -> None:
    if shutil.which("docker") is None:
        _unavailable("docker is not installed (apt-get install docker.io)")
    info = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True)
    if info.returncode != 0:
        _unavailable(f"the docker daemon is not reachable: {info.stderr.strip()[-300:]}")


def _run(cmd: list[str], timeout: float, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)


def _base_image() -> str | None:
    """The locally made Debian base (tests/support/docker_base.sh, which does nothing when it exists); None where
    mmdebstrap is missing: the Dockerfile's public python:3.11-slim-bookworm, pulled from the registry."""
    name = os.environ.get("DICOM_NODE_DOCKER_BASE", "dicom-node-base:bookworm")
    if _run(["docker", "image", "inspect", name], 60).returncode != 0 and shutil.which("mmdebstrap") is None:
        return None
    made = _run(["bash", str(REPO / "tests/support/docker_base.sh")], 900)
    assert made.returncode == 0, f"tests/support/docker_base.sh failed:\n{made.stderr[-3000:]}"
    return made.stdout.split()[-1]


def _torch_index() -> str:
    """PyTorch's CPU-only index if it answers from here, else "" (PyPI)."""
    configured = os.environ.get("DICOM_NODE_DOCKER_TORCH_INDEX_URL")
    if configured is not None:
        return configured
    try:
        urllib.request.urlopen(f"{TORCH_CPU_INDEX}/torch/", timeout=10).close()
        return TORCH_CPU_INDEX
    except OSError:
        return ""


def _build() -> None:
    cmd = ["docker", "build", "-t", IMAGE, "--build-arg", f"TORCH_INDEX_URL={_torch_index()}"]
    base = _base_image()
    if base:
        cmd += ["--build-arg", f"BASE_IMAGE={base}"]
    started = time.monotonic()
    built = _run([*cmd, str(REPO)], 2400)
    assert built.returncode == 0, f"docker build failed:\n{(built.stdout + built.stderr)[-5000:]}"
    print(f"docker build: {time.monotonic() - started:.0f} s ({' '.join(cmd[2:])})")


def _logs(name: str) -> str:
    out = _run(["docker", "logs", name], 60)
    return out.stdout + out.stderr


def _state(name: str) -> str:
    return _run(["docker", "inspect", "--format", "{{.State.Status}}", name], 60).stdout.strip()


def _sr_of(folder: Path, study_uid: str) -> pydicom.Dataset | None:
    """The study's SR as storescp wrote it (SR3.<SOP Instance UID> for a Comprehensive 3D SR), once complete."""
    for path in folder.glob("SR*"):
        try:
            ds = pydicom.dcmread(path)
        except Exception:  # noqa: BLE001 - storescp is still writing it
            continue
        if ds.get("Modality") == "SR" and ds.get("StudyInstanceUID") == study_uid:
            return ds
    return None


def _wait(name: str, predicate, timeout: float, what: str):
    """wait_for, with the node's log in the failure."""
    try:
        return wait_for(predicate, timeout, interval=1, what=what)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\nthe node's log:\n{_logs(name)[-5000:]}") from None


@pytest.mark.slow
@pytest.mark.timeout(3000)
def test_the_image_runs_the_node_as_a_non_root_user_and_returns_an_sr_for_a_real_radiograph(tmp_path):
    _docker_ready()
    for tool in ("echoscu", "storescu", "storescp"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is missing: apt-get install -y dcmtk (README, set-up)")
    _build()

    # the image's own configuration and shipped models
    checked = _run(["docker", "run", "--rm", "--network", "none", IMAGE, "dicom-node", "check-config"], 300)
    assert checked.returncode == 0, f"check-config exited {checked.returncode}:\n{checked.stdout}{checked.stderr}"
    assert "models OK" in checked.stdout and "storage /data" in checked.stdout, checked.stdout
    user = _run(["docker", "image", "inspect", "--format", "{{.Config.User}}", IMAGE], 60).stdout.strip()
    assert user == "dicomnode"

    pacs = DcmtkStoreSCP(tmp_path / "pacs", aet="PACS").start()
    config = {
        "node": {"ae_title": "DICOM_NODE", "host": "127.0.0.1", "port": 0},
        "storage": {"min_free_disk_mb": 1},
        "studies": {"stable_after_s": 1},
        "web": {"host": "127.0.0.1", "port": 0},
        "destinations": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port, "mode": "live"}],
    }
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    config_path.chmod(0o644)
    name = f"dicom-node-test-{uuid.uuid4().hex[:8]}"
    try:
        started = _run(
            [
                *("docker", "run", "-d", "--name", name, "--network", "host"),
                *("-v", f"{config_path}:/app/config.yaml:ro", IMAGE),
            ],
            120,
        )
        assert started.returncode == 0, started.stderr

        def ports() -> tuple[int, str] | None:
            log = _logs(name)
            dicom, web = LISTENING.search(log), WEB.search(log)
            if _state(name) != "running":
                raise AssertionError(f"the node is {_state(name)}:\n{log[-5000:]}")
            return (int(dicom.group(1)), web.group(1)) if dicom and web else None

        port, web = _wait(name, ports, 180, "the node to listen")

        def ready() -> bool:
            try:
                with urllib.request.urlopen(f"{web}/readyz", timeout=5) as r:
                    return r.status == 200
            except (urllib.error.URLError, OSError):
                return False

        _wait(name, ready, 240, "/readyz (database, spool, disk, a live worker)")

        echo = _run(["echoscu", "-aec", "DICOM_NODE", "127.0.0.1", str(port)], 60)
        assert echo.returncode == 0, echo.stdout + echo.stderr
        (study,) = make_real_studies(tmp_path / "studies", 1)
        store = _run(["storescu", "-aec", "DICOM_NODE", "127.0.0.1", str(port), str(study.path)], 120)
        assert store.returncode == 0, store.stdout + store.stderr

        sr = _wait(name, lambda: _sr_of(pacs.out, study.study_uid), 300, "the SR at the storescp")
        assert sr.SOPClassUID == COMPREHENSIVE_3D_SR and sr.Modality == "SR"
        evidence = sr.CurrentRequestedProcedureEvidenceSequence
        referenced = {
            i.ReferencedSOPInstanceUID
            for e in evidence
            for s in e.ReferencedSeriesSequence
            for i in s.ReferencedSOPSequence
        }
        assert study.sop_uid in referenced

        stopped = _run(["docker", "stop", "-t", "60", name], 120)
        assert stopped.returncode == 0, stopped.stderr
        code = _run(["docker", "inspect", "--format", "{{.State.ExitCode}}", name], 60).stdout.strip()
        assert code == "0", f"the node exited {code} on SIGTERM:\n{_logs(name)[-3000:]}"
        assert "Traceback" not in _logs(name), _logs(name)[-5000:]
    finally:
        _run(["docker", "rm", "-f", "-v", name], 120)
        pacs.stop()


def test_the_compose_file_is_valid_and_runs_the_node_postgres_and_the_example_orthanc():
    doc = yaml.safe_load(COMPOSE.read_text())
    services = doc["services"]
    assert set(services) == {"node", "postgres", "orthanc"}
    assert services["node"]["volumes"][0] == "../../config.yaml:/app/config.yaml:ro"
    assert "../orthanc:/srv/docs/orthanc:ro" in services["orthanc"]["volumes"]
    assert all(p.startswith("127.0.0.1:") for p in services["postgres"]["ports"]), "published on 127.0.0.1 only"
    orthanc = (COMPOSE.parent / services["orthanc"]["build"]["dockerfile"]).read_text()
    assert "orthanc-python" in orthanc and "orthanc-dicomweb" in orthanc

    if shutil.which("docker-compose"):
        compose = ["docker-compose"]
    elif shutil.which("docker") and _run(["docker", "compose", "version"], 60).returncode == 0:
        compose = ["docker", "compose"]
    else:
        return  # parsed above; `docker compose config` validates it where compose is installed
    env = {**os.environ, "POSTGRES_PASSWORD": "not-a-secret"}
    out = _run([*compose, "-f", str(COMPOSE), "config"], 120, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    resolved = yaml.safe_load(out.stdout)["services"]
    assert resolved["node"]["environment"]["DICOM_NODE_DATABASE_URL"].startswith("postgresql+psycopg://dicomnode:")
    missing = _run([*compose, "-f", str(COMPOSE), "config"], 120, env={**env, "POSTGRES_PASSWORD": ""})
    assert missing.returncode != 0 and "POSTGRES_PASSWORD" in missing.stdout + missing.stderr
