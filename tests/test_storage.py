"""The Store's state rules on real databases (SQLite, the default, and a PostgreSQL server) and a real spool:
leases, takeover, exactly-once results."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest

from storage import Store
from storage.base import utcnow
from storage.errors import StaleJobError
from storage.ingest import InstanceMeta
from storage.jobs import MAX_JOB_CRASHES, ResultSpec


def meta(sop: str, study: str = "1.2.3", eligible: bool = True) -> InstanceMeta:
    return InstanceMeta(
        sop,
        study,
        "1.2.3.4",
        "1.2.840.10008.5.1.4.1.1.1",
        "1.2.840.10008.1.2.1",
        "CR",
        "CHEST",
        "PA",
        "TEST",
        eligible,
        None if eligible else "not a chest",
    )


def result(sop: str) -> ResultSpec:
    return ResultSpec("sr", sop, "1.2.840.10008.5.1.4.1.1.88.34", "9.9", None, b"DICM" * 10, ("pacs",))


def queued_job(store: Store, study: str = "1.2.3") -> int:
    store.add_instance(b"x" * 100, meta(f"{study}.1", study), stable_after_s=0)
    return store.study_stable(study, utcnow() + timedelta(seconds=1))


def test_concurrent_copies_of_one_instance_are_stored_once(store):
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda _: store.add_instance(b"y" * 1000, meta("5.5"), 10), range(16)))
    assert sum(not g.duplicate for g in got) == 1
    assert store.status()["instances"]["total"] == 1
    assert len(list((store.spool.root / "spool").rglob("*.dcm"))) == 1


def test_new_instances_join_a_queued_job_and_make_a_new_job_after_it_ran(store):
    job = queued_job(store)
    store.add_instance(b"x", meta("1.2.3.2"), stable_after_s=0)
    assert store.study_stable("1.2.3", utcnow() + timedelta(seconds=1)) == job  # still queued: joins it
    claimed = store.claim_job("w1", 60)
    assert claimed.id == job and len(claimed.instances) == 2
    store.finish_job(job, "w1", [result("7.1")])
    store.add_instance(b"x", meta("1.2.3.3"), stable_after_s=0)
    again = store.study_stable("1.2.3", utcnow() + timedelta(seconds=1))
    assert again not in (None, job)  # a re-analysis job
    assert len(store.claim_job("w1", 60).instances) == 3


def test_expired_lease_is_taken_over_and_the_old_worker_cannot_finish(store):
    job = queued_job(store)
    assert store.claim_job("old", lease_s=0.2).id == job
    assert store.claim_job("new", lease_s=60) is None  # lease still held
    time.sleep(0.3)
    taken = store.claim_job("new", lease_s=60)
    assert taken.id == job and taken.attempts == 2
    with pytest.raises(StaleJobError):
        store.finish_job(job, "old", [result("7.1")])
    store.finish_job(job, "new", [result("7.2")])
    assert [r.sop_instance_uid for r in store.results_of_study("1.2.3")] == ["7.2"]
    assert store.status()["deliveries"]["pending"] == 1


def test_renewed_lease_is_not_taken_over(store):
    job = queued_job(store)
    store.claim_job("w1", lease_s=0.5)
    for _ in range(4):
        time.sleep(0.2)
        assert store.renew_lease(job, "w1", 0.5)
    assert store.claim_job("w2", 60) is None


def test_a_job_whose_worker_process_keeps_dying_is_failed_but_lease_expiries_do_not_count(store):
    job = queued_job(store)
    for n in range(MAX_JOB_CRASHES + 2):  # leases that ran out (a whole-node restart): taken over, never failed
        assert store.claim_job(f"w{n}", lease_s=0.05).id == job
        time.sleep(0.1)
    for n in range(MAX_JOB_CRASHES):  # the supervisor saw the worker die while holding it: taken over at once
        assert store.claim_job(f"crash{n}", lease_s=60).id == job
        assert store.worker_died(f"crash{n}", "killed by SIGKILL") == [job]
    assert store.claim_job("last", lease_s=60) is None
    st = store.status()
    assert st["jobs"]["failed"] == 1 and st["jobs"]["running"] == 0
    assert st["workers"] == {"alive": 0, "stale": 0, "dead": 0}  # no heartbeat rows for these names


def test_deliveries_backoff_and_operator_retry(store):
    job = queued_job(store)
    store.claim_job("w", 60)
    store.finish_job(job, "w", [result("7.1")])
    (d,) = store.due_deliveries()
    store.mark_retry(d.id, utcnow() + timedelta(seconds=60), "refused")
    assert store.due_deliveries() == []  # not due before its time
    store.mark_failed(d.id, "rejected")
    assert store.status()["deliveries"]["failed"] == 1
    assert store.retry_failed() == 1
    (again,) = store.due_deliveries()
    assert again.sop_instance_uid == "7.1" and again.attempts == 0
    assert store.is_own_output("7.1") and not store.is_own_output("1.2.3.1")
