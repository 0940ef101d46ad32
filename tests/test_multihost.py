"""Several hosts, on this machine: network namespaces as hosts (tests/support/netns.py), HAProxy in front of two
listener hosts, two worker hosts (one with its clock 2 minutes ahead), PostgreSQL, and one spool bind-mounted at a
different path on each host (tests/support/multihost/cluster.py draws the LAN).

The PACS's storescu sends 100 studies of real radiographs through HAProxy (docs/haproxy/haproxy.cfg, the example
itself), the first 40 to measure the rate with one listener and with two. While the other 60 arrive, every process
of the leading listener host is killed (kill -9), and the studies whose association broke are sent again, as a PACS
retries; they land on the other listener. A worker host is killed in the middle of a job; the other worker, whose
clock is skewed, takes the job over once its lease has run out on the database's clock, and no sooner; then the
killed worker host comes back.

Then every acknowledged instance has been analysed exactly once, each study has one done job and one set of results
at the PACS (SR, and an SC and a GSPS per image, each received once), and no partial file is left in the spool's
tmp/. The figures (studies, kills, takeover times, the rate through HAProxy with one and two listeners) go to
test-artefacts/multihost/figures.json and the test's output.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from support import netns
from support.multihost.cluster import Cluster, make_studies, missing_tools
from support.node import wait_for

REPO = Path(__file__).resolve().parents[1]
ARTEFACTS = REPO / "test-artefacts" / "multihost"
STUDIES = 100
RATE_STUDIES = 20  # per measurement: with one listener, then with two
KILL_LISTENER_AFTER = 15  # studies of the last 60 acknowledged
KILL_WORKER_AFTER = 30  # studies analysed
JOB_LEASE_S = 10.0
STABLE_AFTER_S = 15  # long enough for both rate runs, and for a PACS's retry to complete a study
LEADER_TAKEOVER_MAX_S = 20.0  # the leader's lease (10 s) + a heartbeat (2 s) + polling, with room on a busy machine


@pytest.fixture
def cluster(tmp_path, models):
    why = netns.available()
    missing = missing_tools()
    if why or missing:
        pytest.fail(
            f"the multi-host test needs root, network namespaces and {' '.join(missing) or 'its tools'}: {why or ''} "
            "(apt-get install -y haproxy faketime libfaketime iproute2 postgresql dcmtk)"
        )
    c = Cluster(tmp_path / "cluster", models, stable_after_s=STABLE_AFTER_S, job_lease_s=JOB_LEASE_S)
    try:
        c.up()
        yield c
    finally:
        c.close()  # every process of every host, the namespaces, the LAN, PostgreSQL (logs stay in tmp_path)


def _role(c: Cluster, name: str) -> str | None:
    r = c.readyz(name)
    return r.get("role") if r else None


class WorkerKiller(threading.Thread):
    """Once ``after_done`` studies are analysed, kills worker1's host in the middle of a job, times the takeover by
    worker2, then starts worker1 again (the host is back). If the job ended before the kill landed (the worker did
    not die mid-job), worker1 is started again and it tries again."""

    def __init__(self, c: Cluster, after_done: int):
        super().__init__(daemon=True)
        self.c, self.after_done = c, after_done
        self.held: list[int] = []
        self.killed_at = 0.0
        self.takeover_s: float | None = None
        self.kills = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc

    def _running(self) -> list[int]:
        (done,) = self.c.sql("SELECT count(*) AS n FROM jobs WHERE state = 'done'")
        if done["n"] < self.after_done:
            return []
        rows = self.c.sql("SELECT id FROM jobs WHERE state = 'running' AND worker LIKE 'worker1-%'")
        return [r["id"] for r in rows]

    def _run(self) -> None:
        for _ in range(3):
            held = wait_for(self._running, 400, 0.05, what=f"{self.after_done} studies done and a job on worker1")
            self.c.kill_host("worker1")
            self.killed_at = time.monotonic()
            self.kills += 1
            still = self.c.sql(
                "SELECT id FROM jobs WHERE id = ANY(:ids) AND state = 'running' AND worker LIKE 'worker1-%'", ids=held
            )
            if still:  # it died holding the job
                self.held = [r["id"] for r in still]
                break
            self.c.start_worker("worker1")
        else:
            raise AssertionError("worker1 finished its job before each of 3 kills landed")
        wait_for(
            lambda: self.c.sql("SELECT id FROM jobs WHERE id = ANY(:ids) AND worker LIKE 'worker2-%'", ids=self.held),
            JOB_LEASE_S + 60,
            0.1,
            what="worker2 to take the killed worker's job over",
        )
        self.takeover_s = time.monotonic() - self.killed_at
        self.c.start_worker("worker1")  # the host is back: two workers for the rest


@pytest.mark.slow  # about 3-4 minutes: 4 node processes, PostgreSQL, HAProxy
@pytest.mark.timeout(900)
def test_listeners_behind_haproxy_and_workers_on_other_hosts_survive_lost_hosts(cluster, tmp_path):
    c = cluster
    studies = make_studies(tmp_path / "studies", STUDIES)
    sent_uids = {u for s in studies for u in s.sop_uids}
    figures: dict = {"studies": STUDIES, "instances": len(sent_uids)}
    t0 = time.monotonic()
    phases: dict[str, float] = {}

    c.launch("listener1")
    c.launch("listener2")
    c.launch("worker1")
    c.launch("worker2", skew="+120s")
    c.wait_started("listener1", "listener2", "worker1", "worker2")
    skew = c.clock_offset("worker2")  # libfaketime: Python's time.time() and datetime.now() there are 2 min ahead
    assert 115 < skew < 125 and abs(c.clock_offset("worker1")) < 5, skew
    figures["worker2_clock_offset_s"] = round(skew)
    c.wait_up("listener1", "listener2")
    phases["start"] = time.monotonic() - t0

    # The rate through HAProxy: one listener (the other in maintenance), then two. Both runs end before the first
    # study is stable (studies.stable_after_s), so that no analysis competes with either for the CPU.
    c.set_server("listener2", enabled=False)
    one = c.send(studies[:RATE_STUDIES])
    c.set_server("listener2", enabled=True)
    c.wait_up("listener1", "listener2")
    two = c.send(studies[RATE_STUDIES : 2 * RATE_STUDIES])
    figures["rate_one_listener_instances_per_s"] = round(one.per_second, 2)
    figures["rate_two_listeners_instances_per_s"] = round(two.per_second, 2)
    figures["rate_ratio_two_to_one"] = round(two.per_second / one.per_second, 2)
    figures["rate_runs_overlapped_analysis"] = bool(c.sql("SELECT id FROM jobs WHERE started_at IS NOT NULL"))
    assert not one.failures and not two.failures, (one.failures, two.failures)

    phases["rate_runs"] = time.monotonic() - t0 - sum(phases.values())

    # The rest while hosts are lost: the leading listener mid-transfer, a worker mid-job.
    killer = WorkerKiller(c, after_done=KILL_WORKER_AFTER)
    killer.start()
    roles = {n: _role(c, n) for n in ("listener1", "listener2")}
    doomed = next((n for n, r in roles.items() if r == "leader"), "listener1")
    survivor = "listener2" if doomed == "listener1" else "listener1"
    lost: dict = {}

    def kill_listener() -> None:
        # mid-transfer: while HAProxy has an association open to it
        wait_for(lambda: int(c.haproxy_servers()[doomed]["scur"]) > 0, 30, 0.01, what=f"an association on {doomed}")
        lost["sessions_before"] = int(c.haproxy_servers()[survivor]["stot"])
        lost["processes"] = c.kill_host(doomed)
        lost["at"] = time.monotonic()
        if roles[doomed] == "leader":
            wait_for(lambda: _role(c, survivor) == "leader", 60, 0.1, what=f"{survivor} to lead")
            lost["leader_takeover_s"] = time.monotonic() - lost["at"]

    listener_killer = threading.Thread(target=kill_listener, daemon=True)

    def on_acked(n: int) -> None:
        if n == KILL_LISTENER_AFTER:
            listener_killer.start()

    rest = c.send(studies[2 * RATE_STUDIES :], on_acked=on_acked, max_attempts=20)
    listener_killer.join(90)
    assert lost.get("processes"), "the listener host was not killed"
    assert rest.retried, "no association was broken by the kill: it was not mid-transfer"

    # Everything analysed and delivered.
    def settled() -> bool:
        if killer.error:
            raise killer.error
        (row,) = c.sql(
            "SELECT count(*) FILTER (WHERE state IN ('queued', 'running')) AS busy, "
            "count(DISTINCT study_uid) FILTER (WHERE state = 'done') AS done FROM jobs"
        )
        (d,) = c.sql("SELECT count(*) FILTER (WHERE state <> 'delivered') AS open, count(*) AS n FROM deliveries")
        return row["busy"] == 0 and row["done"] == STUDIES and d["open"] == 0 and d["n"] > 0

    phases["send_with_kills"] = time.monotonic() - t0 - sum(phases.values())
    wait_for(settled, 420, 1, what="every study analysed and its results delivered")
    phases["until_all_delivered"] = time.monotonic() - t0 - sum(phases.values())
    killer.join(60)
    if killer.error:
        raise killer.error
    assert killer.takeover_s is not None, "the worker's job was not taken over"

    # Every acknowledged instance analysed exactly once: one done job per study, one verdict per image.
    instances = c.sql("SELECT sop_instance_uid, eligible FROM instances")
    assert {r["sop_instance_uid"] for r in instances} == sent_uids and all(r["eligible"] for r in instances)
    jobs = c.sql("SELECT id, study_uid, state, attempts, worker FROM jobs")
    per_study = Counter(j["study_uid"] for j in jobs)
    assert set(per_study) == {s.uid for s in studies} and set(per_study.values()) == {1}, "one job per study"
    assert {j["state"] for j in jobs} == {"done"}
    verdicts = Counter(r["sop_instance_uid"] for r in c.sql("SELECT sop_instance_uid FROM image_results"))
    assert set(verdicts) == sent_uids and set(verdicts.values()) == {1}, "each image analysed once"
    # Only the killed worker's job was run twice: the skewed worker took no job from a live worker.
    again = sorted(j["id"] for j in jobs if j["attempts"] != 1)
    assert again == sorted(killer.held), f"jobs run more than once: {again}, held by the killed worker: {killer.held}"
    assert all(j["worker"].startswith("worker2-") for j in jobs if j["id"] in killer.held)
    # ... and not before its lease ran out (renewed every lease/3): the skew of +120 s changed nothing.
    assert JOB_LEASE_S * 2 / 3 - 1 <= killer.takeover_s <= JOB_LEASE_S + 30, killer.takeover_s

    # One set of results per study at the PACS, each object received once.
    received = c.pacs_objects()
    assert len({sop for _, _, sop in received}) == len(received), "an object reached the PACS twice"
    by_study = Counter((study, modality) for study, modality, _ in received)
    for s in studies:
        n = len(s.files)
        got = (by_study[(s.uid, "SR")], by_study[(s.uid, "OT")], by_study[(s.uid, "PR")])
        assert got == (1, n, n), f"study {s.uid}: SR, SC, GSPS received {got}, expected (1, {n}, {n})"

    # The retries went to the survivor; HAProxy took the lost listener out.
    servers = c.haproxy_servers()
    assert servers[doomed]["status"] == "DOWN" and servers[survivor]["status"] == "UP"
    assert int(servers[survivor]["stot"]) - lost["sessions_before"] >= len(rest.retried)
    if roles[doomed] == "leader":
        assert lost["leader_takeover_s"] <= LEADER_TAKEOVER_MAX_S

    # The instances as `dicom-node status --json` lists them, on the survivor's host.
    def nodes() -> dict:
        status = c.cli(survivor, "status", "--json")
        assert status.returncode == 0, status.stderr
        return {n["name"]: n for n in json.loads(status.stdout)["nodes"]}

    listed = wait_for(
        lambda: (n := nodes())[doomed]["state"] != "running" and n[survivor]["role"] == "leader" and n,
        30,
        1,
        what=f"status to list {doomed} gone and {survivor} leading",
    )
    leaders = [name for name, n in listed.items() if n["role"] == "leader"]
    assert leaders == [survivor] and listed[survivor]["state"] == "running", listed

    # Nothing left in tmp/: the lost listener's partial transfer is removed by the leader once that host is gone.
    leftovers_at_end = len(c.tmp_files())
    wait_for(lambda: not c.tmp_files(), 60, 1, what="tmp/ to be empty")
    phases["checks"] = time.monotonic() - t0 - sum(phases.values())

    figures.update(
        {
            "hosts": "2 listeners (serve, no workers) behind HAProxy, 2 worker hosts (one +120 s), PostgreSQL",
            "kills": {
                "listener_host": doomed,
                "listener_was": roles[doomed],
                "listener_processes": lost["processes"],
                "worker_host": "worker1",
                "worker_kills": killer.kills,
            },
            "studies_resent": len(rest.retried),
            "associations_broken": len(rest.failures),
            "leader_takeover_s": round(lost["leader_takeover_s"], 1) if "leader_takeover_s" in lost else None,
            "job_takeover_s": round(killer.takeover_s, 1),
            "job_lease_s": JOB_LEASE_S,
            "tmp_files_after_delivery": leftovers_at_end,
            "seconds": {k: round(v, 1) for k, v in phases.items()},
        }
    )
    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    (ARTEFACTS / "figures.json").write_text(json.dumps(figures, indent=2) + "\n")
    print("multi-host figures:", json.dumps(figures, indent=2))


def test_the_haproxy_example_is_valid_and_checks_readyz():
    """docs/haproxy/haproxy.cfg as shipped: HAProxy accepts it, TCP mode, leastconn, /readyz health checks on the
    web port, and timeouts longer than the nodes' network_timeout_s."""
    from dicom_node.config import Config
    from support.multihost.cluster import HAPROXY_EXAMPLE

    if subprocess.run(["sh", "-c", "command -v haproxy"], capture_output=True).returncode:
        pytest.fail("haproxy is missing: apt-get install -y haproxy")
    r = subprocess.run(["haproxy", "-c", "-f", str(HAPROXY_EXAMPLE)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    text = HAPROXY_EXAMPLE.read_text()
    for line in ("mode tcp", "balance leastconn", "option httpchk GET /readyz", "http-check expect status 200"):
        assert line in text
    network_timeout = Config().node.network_timeout_s
    for side in ("client", "server"):
        (value,) = [ln.split()[2] for ln in text.splitlines() if ln.split()[:2] == ["timeout", side]]
        assert int(value.rstrip("s")) > network_timeout
    servers = [ln for ln in text.splitlines() if ln.split()[:1] == ["server"]]
    assert servers and all("check port 8480" in ln for ln in servers)
