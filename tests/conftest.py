"""Shared fixtures. Real processes, real associations on 127.0.0.1, real dcmtk tools; no mocks."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SAMPLES = SHARED / "samples"
DATASETS = SHARED / "datasets"

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("YOLO_CONFIG_DIR", str(REPO / ".yolo"))
os.environ.setdefault("MPLCONFIGDIR", str(REPO / ".yolo" / "mpl"))
# One compute thread per process: the test processes (pytest-xdist) and the nodes, workers and commands they start
# already share the cores; more threads per process would only spin against each other. A test that needs more
# threads sets them itself.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from support.node import NodeProcess, free_port, wait_for  # noqa: E402

__all__ = ["NodeProcess", "free_port", "wait_for"]


def pytest_collection_modifyitems(config, items):
    """The slow tests first (stable otherwise): the test processes then finish together, instead of one of them
    running the last browser or Orthanc test alone while the other is done."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.fail(f"{path} is missing: the tests read real data from ../shared beside the repository")
    return path


@pytest.fixture(scope="session")
def samples_dir() -> Path:
    return _need(SAMPLES)


@pytest.fixture(scope="session")
def datasets_dir() -> Path:
    return _need(DATASETS)


@pytest.fixture
def node_factory(tmp_path):
    """Start `dicom-node serve` processes with a config written into tmp_path; all are killed at the end."""
    started: list[NodeProcess] = []

    def make(**overrides) -> NodeProcess:
        proc = NodeProcess(tmp_path / f"node{len(started)}", **overrides)
        proc.start()
        started.append(proc)
        return proc

    yield make
    for p in started:
        p.kill()


@pytest.fixture(scope="module")
def shared_node(tmp_path_factory):
    """One `dicom-node serve` with the default test configuration, shared by the tests of a module that only send
    to it and read back what they sent (by UID, by count before and after, by the log since a mark). A test that
    configures, stops or restarts its node makes its own with node_factory."""
    proc = NodeProcess(tmp_path_factory.mktemp("shared-node"))
    proc.start()
    yield proc
    proc.kill()


@pytest.fixture(scope="session")
def postgres_server():
    """One throwaway PostgreSQL server for the session (Debian's postgresql package, see tests/postgres.py)."""
    from support.postgres import PostgresServer, find_bin

    bindir = find_bin()
    if bindir is None:
        pytest.fail("PostgreSQL server binaries are missing: apt-get install -y postgresql (README, set-up)")
    server = PostgresServer(bindir).start()
    yield server
    server.stop()


@pytest.fixture
def postgres_url(postgres_server) -> str:
    """The SQLAlchemy URL of a new, empty PostgreSQL database."""
    return postgres_server.new_database()


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    """Tiny model files that load fast (classifier says 0.8, the detector boxes something): ``inference.models``
    for a node under test. Modules that need other models define their own ``models``."""
    from support.models import make_tiny_models

    clf, det = make_tiny_models(tmp_path_factory.mktemp("models"), p_abnormal=0.8, detector_logit=-0.3)
    return {"classifier": str(clf), "detector": str(det)}


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path):
    """A Store on each supported database in turn (a module whose tests need another store defines its own)."""
    from storage import Store

    url = (
        f"sqlite:///{tmp_path / 'db.sqlite3'}" if request.param == "sqlite" else request.getfixturevalue("postgres_url")
    )
    s = Store(url, tmp_path / "var")
    yield s
    s.close()
