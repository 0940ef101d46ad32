"""Retention: studies nothing waits for are removed after retention.keep_days, and the oldest first when the disk
is above its high watermark; rows and files go together; a study with a queued job, a running job, a pending or
failed delivery, or a running study timer is never removed. The store is the real one (SQLite, spool files);
the clock is the test's, and the disk a real tmpfs."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from storage import Store
from storage.base import utcnow
from storage.ingest import InstanceMeta
from storage.jobs import ResultSpec
from storage.retention import Purger, RetentionPolicy, disk_used_percent
from support.dicom_factory import make_cxr

DX = "1.2.840.10008.5.1.4.1.1.1.1"
SR = "1.2.840.10008.5.1.4.1.1.88.34"
T0 = utcnow() - timedelta(days=100)


def add_study(store: Store, received_at, *, images: int = 1, size: int = 32, eligible: bool = True) -> str:
    study = generate_uid()
    for _ in range(images):
        ds = make_cxr(rows=size, cols=size, study_uid=study)
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        meta = InstanceMeta(
            sop_instance_uid=ds.SOPInstanceUID,
            study_uid=study,
            series_uid=ds.SeriesInstanceUID,
            sop_class_uid=DX,
            transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
            modality="DX",
            body_part="CHEST",
            view_position="PA",
            calling_ae="PACS",
            eligible=eligible,
            skip_reason=None if eligible else "not a chest film",
        )
        store.add_instance(buf.getvalue(), meta, stable_after_s=60, now=received_at)
    return study


def analyse(store: Store, study: str, received_at, *, finish: bool = True, deliver: str | None = "delivered"):
    """What the node does next: the timer fires, a worker takes the job and finishes it with one SR for PACS;
    the sender delivers it (``deliver``: delivered, failed, or None = still pending)."""
    job = store.study_stable(study, now=received_at + timedelta(minutes=5))
    if job is None or not finish:
        return job
    info = store.claim_job("w1", 600)
    assert info is not None and info.id == job
    sr = ResultSpec("sr", generate_uid(), SR, generate_uid(), None, b"\0" * 128 + b"DICM" + b"\0" * 512, ("PACS",))
    store.finish_job(job, "w1", [sr])
    for d in store.due_deliveries(now=utcnow() + timedelta(days=1)):
        if deliver == "delivered":
            store.mark_delivered(d.id)
        elif deliver == "failed":
            store.mark_failed(d.id, "refused")
    return job


def files_of(store: Store) -> set[str]:
    return {str(p) for folder in (store.spool.files, store.spool.results) for p in folder.rglob("*") if p.is_file()}


def rows_of(store: Store, study: str) -> int:
    from sqlalchemy import text

    with store.engine.connect() as c:
        return sum(
            c.execute(text(f"SELECT count(*) FROM {t} WHERE study_uid = :s"), {"s": study}).scalar()
            for t in ("studies", "instances", "jobs", "results")
        )


@pytest.fixture
def store(tmp_path):
    s = Store(f"sqlite:///{tmp_path / 'db.sqlite3'}", tmp_path / "var", 0)
    yield s
    s.close()


def test_keep_days_removes_only_what_nothing_waits_for(store):
    old = T0
    done = add_study(store, old, images=2)
    analyse(store, done, old)
    no_job = add_study(store, old, eligible=False)  # never analysed: nothing to deliver
    store.study_stable(no_job, now=old + timedelta(minutes=5))
    pending = add_study(store, old)
    analyse(store, pending, old, deliver=None)
    failed = add_study(store, old)
    analyse(store, failed, old, deliver="failed")
    recent = add_study(store, utcnow() - timedelta(days=2))
    analyse(store, recent, utcnow() - timedelta(days=2))
    queued = add_study(store, old)
    analyse(store, queued, old, finish=False)
    receiving = add_study(store, old)  # its timer has not fired
    kept = [pending, failed, queued, receiving, recent]
    before = files_of(store)

    reports = Purger(store, RetentionPolicy(keep_days=30)).run(now=utcnow())

    assert [(r.studies, r.instances, r.results) for r in reports] == [(2, 3, 1)]
    assert "older than 30 days" in reports[0].reason and reports[0].bytes > 0
    assert rows_of(store, done) == 0 and rows_of(store, no_job) == 0
    assert all(rows_of(store, s) > 0 for s in kept)
    left = files_of(store)
    assert len(before) - len(left) == 4 and left < before  # 3 instances + 1 SR, no other file touched
    assert not list(store.spool.tmp.iterdir())
    status = store.status()["purged"]
    assert status["studies"] == 2 and status["instances"] == 3 and status["last_at"]
    assert Purger(store, RetentionPolicy(keep_days=30)).run(now=utcnow()) == []  # nothing more to do
    # the same study sent again is stored (and would be analysed) anew
    again = add_study(store, utcnow())
    assert rows_of(store, again) > 0


def test_a_study_that_starts_waiting_is_not_removed(store):
    study = add_study(store, T0)
    analyse(store, study, T0)
    assert store.purgeable_studies() == [study]
    store.reanalyze(study)  # an operator queued a re-analysis meanwhile
    assert store.purge_study(study) == (0, 0, 0) and rows_of(store, study) > 0


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_above_the_high_watermark_the_oldest_finished_studies_go_first(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(disk)], check=True)
    try:
        store = Store(f"sqlite:///{tmp_path / 'db.sqlite3'}", disk, 0)
        studies = []
        for day in range(4):  # 4 finished studies of ~1 MB each, oldest first
            when = T0 + timedelta(days=day)
            s = add_study(store, when, images=2, size=512)
            analyse(store, s, when)
            studies.append(s)
        busy = add_study(store, T0 - timedelta(days=1), images=2, size=512)  # the oldest, but still pending
        analyse(store, busy, T0 - timedelta(days=1), deliver=None)
        full = disk_used_percent(disk)
        assert full > 50, full
        policy = RetentionPolicy(high_watermark_percent=40, low_watermark_percent=30)
        reports = Purger(store, policy).run()
        assert len(reports) == 1 and "above 40 %" in reports[0].reason
        gone = [s for s in studies if rows_of(store, s) == 0]
        assert gone == studies[: len(gone)] and gone  # oldest first
        assert rows_of(store, busy) > 0  # never the pending one, old as it is
        assert disk_used_percent(disk) <= 30 or len(gone) == len(studies)
        store.close()
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_the_node_reports_what_retention_removed(node_factory, tmp_path):
    node = node_factory(retention={"keep_days": 1, "check_interval_s": 3600})
    out = node.cli("status")
    assert "purged" in out.stdout
    bad = Path(node.folder) / "bad.yaml"
    bad.write_text("retention:\n  high_watermark_percent: 50\n  low_watermark_percent: 60\n")
    res = subprocess.run(
        [sys.executable, "-m", "dicom_node", "check-config", "--config", str(bad)], capture_output=True, text=True
    )
    assert res.returncode == 2 and "low_watermark_percent must be below" in res.stdout + res.stderr


def test_the_running_node_removes_an_expired_study_and_says_so(node_factory, tmp_path):
    from support.node import wait_for
    from support.scu import send_file

    # keep_days of about 1 s: a lateral film (stored, nothing to analyse or deliver) expires at once
    node = node_factory(retention={"keep_days": 1.2e-5, "check_interval_s": 1}, studies={"stable_after_s": 0.5})
    make_cxr(tmp_path / "lat.dcm", rows=32, cols=32, view="LL")
    assert send_file(node, tmp_path / "lat.dcm").Status == 0x0000
    wait_for(lambda: node.status()["purged"]["studies"] == 1, 20, what="the node's retention run")
    assert node.status()["instances"]["total"] == 0
    root = Path(node.config["storage"]["root"])
    assert not [p for p in (root / "spool").rglob("*") if p.is_file()]
    assert "retention: removed 1 studies" in node.log()
    purges = [line for line in (root / "audit.jsonl").read_text().splitlines() if '"purge"' in line]
    assert len(purges) == 1 and '"studies": 1' in purges[0]


def test_a_spool_the_database_does_not_know_is_left_alone(store, tmp_path):
    """Start-up sets unreferenced files aside; but when most of the spool is unknown (a wrong database URL),
    it moves nothing and says why."""
    from storage.errors import StorageError

    for _ in range(12):
        add_study(store, T0)
    other = Store(f"sqlite:///{tmp_path / 'other.sqlite3'}", store.spool.root, 0)  # an empty database, same spool
    try:
        before = files_of(store)
        with pytest.raises(StorageError, match="unknown to the database"):
            other.remove_unreferenced_files()
        assert files_of(store) == before
        assert store.remove_unreferenced_files() == 0  # its own database knows them all
    finally:
        other.close()
