"""Several `serve` instances on one database (issue 23): one leader at a time, taken over when it stops or dies;
time kept on the database's clock whatever a host's clock says; spool paths relative to storage.root, so each
host may mount the spool where it likes; partial files of a lost host cleaned up.

The multi-host test with network namespaces, HAProxy and kills is tests/test_multihost.py; these are the same
rules, each checked on its own with real PostgreSQL and real `serve` processes on 127.0.0.1."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from storage import Store
from storage.base import utcnow
from storage.cluster import DuplicateInstanceError
from storage.spool import Spool
from support.dcmtk import DcmtkStoreSCP
from support.dicom_factory import make_cxr
from support.node import NodeProcess, wait_for

LIBFAKETIME = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")
RELEASE_0_1 = Path(__file__).parent / "data" / "release-0.1.sqlite3"


def test_one_leader_at_a_time_and_a_clean_stop_hands_the_lease_over_at_once(tmp_path, postgres_url):
    a = Store(postgres_url, tmp_path / "a", 0, owner="a")
    b = Store(postgres_url, tmp_path / "b", 0, owner="b")
    try:
        for store, name in ((a, "a"), (b, "b")):
            store.register_node(name, "host-" + name, os.getpid(), f"{name}:11112", f"{name}:8480", "0.1.0", 15)
        assert a.node_heartbeat("a", 10) == "leader"
        assert b.node_heartbeat("b", 10) == "follower"
        assert a.node_heartbeat("a", 10) == "leader"  # renewed, not lost to the other
        nodes = {n.name: n for n in b.nodes(15)}
        assert (nodes["a"].role, nodes["b"].role) == ("leader", "follower")
        assert {n.state for n in nodes.values()} == {"running"}
        a.node_stopped("a")
        assert b.node_heartbeat("b", 10) == "leader"  # no waiting for the lease: it was handed back
        assert {n.name: (n.state, n.role) for n in b.nodes(15)} == {
            "b": ("running", "leader"),
            "a": ("stopped", "follower"),
        }
    finally:
        a.close()
        b.close()


def test_a_dead_leaders_lease_runs_out_and_another_instance_takes_over(tmp_path, postgres_url):
    a = Store(postgres_url, tmp_path / "a", 0, owner="a")
    b = Store(postgres_url, tmp_path / "b", 0, owner="b")
    try:
        assert a.node_heartbeat("a", 1.0) == "leader"
        assert b.node_heartbeat("b", 1.0) == "follower"
        time.sleep(1.3)  # a stops beating (killed): its lease runs out
        assert b.node_heartbeat("b", 1.0) == "leader"
        assert a.node_heartbeat("a", 1.0) == "follower"  # back from a stall: it does not lead any more
        assert b.leader()[0] == "b"
    finally:
        a.close()
        b.close()


def test_a_second_running_instance_with_the_same_name_is_refused_a_restarted_one_is_not(tmp_path, postgres_url):
    store = Store(postgres_url, tmp_path / "a", 0)
    try:
        store.register_node("a", "other-host", 4242, "", "", "0.1.0", 15)
        store.node_heartbeat("a", 10)
        with pytest.raises(DuplicateInstanceError, match="node.instance_name"):
            store.register_node("a", "this-host", os.getpid(), "", "", "0.1.0", 15)
        gone = subprocess.Popen([sys.executable, "-c", "pass"])
        gone.wait()  # a process of this host that has exited (killed, say), under the same name
        store.register_node("b", os.uname().nodename, gone.pid, "", "", "0.1.0", 15)
        store.register_node("b", os.uname().nodename, os.getpid(), "", "", "0.1.0", 15)  # its restart
    finally:
        store.close()


SKEWED = """
import json, sys
from datetime import UTC, datetime
from storage import Store
from storage.base import utcnow
store = Store(sys.argv[1], sys.argv[2], 0, owner="skewed")
store.register_node("skewed", "skewed-host", 1, "", "", "0.1.0", 15)
role = store.node_heartbeat("skewed", 10)
print(json.dumps({"local": datetime.now(UTC).replace(tzinfo=None).isoformat(), "db": utcnow().isoformat(),
                  "role": role}))
store.close()
"""


@pytest.mark.parametrize("skew", ["+120s", "-120s"])
def test_leases_hold_on_the_database_clock_when_a_hosts_clock_is_two_minutes_off(tmp_path, postgres_url, skew):
    assert LIBFAKETIME.exists(), "libfaketime is needed (apt-get install libfaketime)"
    env = {
        **os.environ,
        "LD_PRELOAD": str(LIBFAKETIME),
        "FAKETIME": skew,
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
        "PYTHONPATH": str(Path(__file__).parent.parent),
    }
    out = subprocess.run(
        [sys.executable, "-c", SKEWED, postgres_url, str(tmp_path / "skewed")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    from datetime import datetime

    here = Store(postgres_url, tmp_path / "here", 0)
    try:
        now = utcnow()
        local, db = datetime.fromisoformat(seen["local"]), datetime.fromisoformat(seen["db"])
        assert abs((local - now).total_seconds()) > 100, "the host's clock was not skewed"
        assert abs((db - now).total_seconds()) < 10, "the skewed host did not keep the database's time"
        assert seen["role"] == "leader"
        # its 10 s lease, taken on the database's clock, holds now: not 2 minutes gone, not 2 minutes longer
        holder = here.leader()
        assert holder is not None and holder[0] == "skewed"
        assert here.node_heartbeat("here", 10) == "follower"
        time.sleep(0.1)
        assert [n.state for n in here.nodes(15) if n.name == "skewed"] == ["running"]
    finally:
        here.close()


def test_paths_are_kept_relative_so_a_spool_mounted_elsewhere_still_works(tmp_path):
    db = tmp_path / "old.sqlite3"
    shutil.copy(RELEASE_0_1, db)  # release 0.1 kept absolute paths (/tmp/.../spool/..)
    moved = tmp_path / "mounted-elsewhere"
    store = Store(f"sqlite:///{db}", moved, 0)  # migrated on opening
    try:
        with store.engine.connect() as c:
            from sqlalchemy import text

            paths = [r[0] for r in c.execute(text("SELECT path FROM instances UNION ALL SELECT path FROM results"))]
        assert len(paths) == 2 and all(p.startswith(("spool/", "results/")) for p in paths), paths
        rows = store.results_of_study("1.2.3.4")
        assert rows and store.spool.resolve(rows[0].path).parent.parent.parent == moved / "results"
    finally:
        store.close()

    # a new spool: what one host writes, another host with the spool at another path reads
    shared = tmp_path / "shared"
    shared.mkdir()
    (tmp_path / "host-b").symlink_to(shared)  # the same folder under another path
    url = f"sqlite:///{tmp_path / 'new.sqlite3'}"
    a = Store(url, shared, 0, owner="a")
    b = Store(url, tmp_path / "host-b", 0, owner="b")
    try:
        (study, sop) = generate_uid(), generate_uid()
        from storage.ingest import InstanceMeta

        fields = dict.fromkeys(InstanceMeta.__dataclass_fields__, "")
        fields.update(study_uid=study, sop_instance_uid=sop, series_uid=generate_uid(), eligible=True, skip_reason=None)
        meta = InstanceMeta(**fields)
        a.add_instance(b"DICM-bytes", meta, stable_after_s=0)
        found = b.instance_file(sop)
        assert found is not None and str(found).startswith(str(tmp_path / "host-b"))
        assert found.read_bytes() == b"DICM-bytes"
    finally:
        a.close()
        b.close()


def test_partial_files_of_a_gone_process_are_removed_never_a_live_ones(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'db.sqlite3'}", tmp_path / "var", 0, owner="leader")
    try:
        tmp = store.spool.tmp_root
        for owner in ("alive", "gone"):
            (tmp / owner).mkdir()
            old = tmp / owner / "old.part"
            old.write_bytes(b"x")
            os.utime(old, (time.time() - 60, time.time() - 60))
            (tmp / owner / "young.part").write_bytes(b"x")  # being written right now
        assert store.spool.clean_tmp_of({"alive", "leader"}, min_age_s=30) == 1
        assert sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*.part")) == [
            "alive/old.part",
            "alive/young.part",
            "gone/young.part",
        ]
    finally:
        store.close()


def test_a_process_restarted_under_its_name_keeps_its_tmp_folder_through_the_leaders_sweep(tmp_path):
    """A worker killed and restarted under the same name is not live until its first heartbeat (after its models
    load): the leader's sweep meanwhile must leave its (empty, long untouched) tmp folder, or every write of the
    restarted worker fails. An empty folder nobody has touched for 10 minutes is removed."""
    root = tmp_path / "var"
    leader = Store(f"sqlite:///{tmp_path / 'db.sqlite3'}", root, 0, owner="leader")
    try:
        tmp = leader.spool.tmp_root
        ages = {"worker-1": 3600, "gone-long-ago": 3600, "gone-a-minute-ago": 60}
        for folder, age in ages.items():
            (tmp / folder).mkdir()
            os.utime(tmp / folder, (time.time() - age, time.time() - age))
        restarted = Spool(root, owner="worker-1")  # the worker starts again, its heartbeat not recorded yet
        leader.spool.clean_tmp_of({"leader"}, min_age_s=15)
        # an owner gone a minute ago may be a process still starting: its folder stays for 10 minutes
        assert sorted(p.name for p in tmp.iterdir()) == ["gone-a-minute-ago", "leader", "worker-1"]
        restarted.write_file(b"a result", root / "results" / "r.dcm")  # its writes go through its tmp folder
        assert (root / "results" / "r.dcm").read_bytes() == b"a result"
    finally:
        leader.close()


def _ready(node: NodeProcess) -> dict:
    try:
        with urllib.request.urlopen(f"{node.web_url}/readyz", timeout=5) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        return json.loads(e.read())


@pytest.mark.slow  # two serve processes with a worker each
def test_two_serves_on_one_database_deliver_each_study_once_and_the_follower_takes_over(tmp_path, postgres_url, models):
    pacs = DcmtkStoreSCP(tmp_path / "pacs").start()
    shared = tmp_path / "spool"
    shared.mkdir()
    (tmp_path / "spool-b").symlink_to(shared)  # host b mounts the spool elsewhere
    common = {
        "storage": {"database_url": postgres_url},
        "workers": {"count": 1},
        "inference": {"models": models},
        "destinations": [
            {
                "name": "pacs",
                "ae_title": "PACS",
                "host": "127.0.0.1",
                "port": pacs.port,
                "mode": "live",
                "outputs": ["sr"],
            }
        ],
        "delivery": {"backoff_initial_s": 0.5, "connect_timeout_s": 3},
    }
    a = NodeProcess(tmp_path / "a", **common, node={"instance_name": "a"})
    b = NodeProcess(tmp_path / "b", **common, node={"instance_name": "b"})
    a.config["storage"]["root"], b.config["storage"]["root"] = str(shared), str(tmp_path / "spool-b")
    a._write_config()
    b._write_config()
    try:
        a.start()
        b.start()
        assert (_ready(a)["role"], _ready(b)["role"]) == ("leader", "follower")
        studies = []
        for i, node in enumerate((a, b, b, a)):
            study = generate_uid()
            make_cxr(tmp_path / f"s{i}.dcm", study_uid=study)
            assert node.storescu(tmp_path / f"s{i}.dcm").returncode == 0
            studies.append(study)
        wait_for(lambda: len(pacs.received()) >= 4, 180, what="one SR per study")
        time.sleep(2)  # a second sender would have sent its copies by now
        assert sorted(d.StudyInstanceUID for d in pacs.received()) == sorted(studies)

        status = json.loads(b.cli("status", "--json").stdout)
        assert {(n["name"], n["role"]) for n in status["nodes"]} == {("a", "leader"), ("b", "follower")}

        a.kill()  # kill -9: no hand-over, the lease runs out
        killed = time.monotonic()
        wait_for(lambda: _ready(b).get("role") == "leader", 30, interval=0.2, what="b to lead")
        takeover = time.monotonic() - killed
        assert takeover < 10 + 2 + 2, takeover  # the lease, a heartbeat, and slack for a loaded machine
        late = generate_uid()
        make_cxr(tmp_path / "late.dcm", study_uid=late)
        assert b.storescu(tmp_path / "late.dcm").returncode == 0
        wait_for(lambda: len(pacs.received()) >= 5, 120, what="the new leader to send")
        assert sorted(d.StudyInstanceUID for d in pacs.received()) == sorted([*studies, late])
        assert "instance b is now the leader" in b.log()
        tmp_files = [p for p in (shared / "tmp").rglob("*") if p.is_file()]
        assert tmp_files == []
        print(f"takeover after kill -9 of the leader: {takeover:.1f} s")
    finally:
        a.kill()
        b.kill()
        pacs.stop()
