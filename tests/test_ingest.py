"""Receiving over DICOM: real `dicom-node serve` processes, dcmtk clients and pynetdicom on 127.0.0.1.

Tests of the default configuration share one node (``shared_node``) and check what they sent by its UIDs, by
counts before and after, and by the log since a mark; tests that configure, stop or restart a node start their own.
"""

from __future__ import annotations

import json
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import DigitalXRayImageStorageForPresentation

from support.dicom_factory import compress, make_cxr
from support.models import make_tiny_models
from support.node import wait_for
from support.scu import send_file


def instances(node) -> list[dict]:
    return node.rows("SELECT * FROM instances")


def by_sop(node) -> dict[str, dict]:
    return {r["sop_instance_uid"]: r for r in instances(node)}


def total(node) -> int:
    return node.status()["instances"]["total"]


def jobs_of(node, *study_uids: str) -> list[dict]:
    marks = ",".join("?" * len(study_uids))
    return node.rows_of(f"SELECT * FROM jobs WHERE study_uid IN ({marks})", study_uids)


def spool_files_of(node, study_uid: str) -> list[Path]:
    folder = node.store().spool.instance_path(study_uid, "any").parent  # the study's folder of received files
    return sorted(folder.glob("*.dcm"))


def ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Store Failed" not in result.stderr and "Failed" not in result.stdout, result.stderr


def test_echoscu_and_pynetdicom_echo(shared_node):
    node = shared_node
    r = subprocess.run(["echoscu", "-aec", node.ae_title, "127.0.0.1", str(node.port)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title)
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()


def test_real_samples_stored_byte_for_byte(shared_node, samples_dir):
    node = shared_node
    before = node.status()["instances"]
    j2k, nometa = samples_dir / "pydicomdata_RG1_J2KI.dcm", samples_dir / "fodicom_CR-MONO1-10-chest.dcm"
    ok(node.storescu(j2k, extra=("-xw",)))
    ok(node.storescu(nometa))
    rows = by_sop(node)
    for src, syntax in ((j2k, "1.2.840.10008.1.2.4.91"), (nometa, None)):
        original = pydicom.dcmread(src, force=True)
        row = rows[original.SOPInstanceUID]
        assert row["eligible"] == 1 and row["skip_reason"] is None
        assert row["modality"] == "CR" and row["view_position"] == "PA" and row["calling_ae"] == "STORESCU"
        stored = pydicom.dcmread(row["path"])
        assert stored.StudyInstanceUID == original.StudyInstanceUID
        if syntax:  # compressed data is kept as received, never decoded and re-encoded
            assert stored.file_meta.TransferSyntaxUID == syntax
            assert stored.PixelData == original.PixelData
    after = node.status()["instances"]
    assert {k: after[k] - before[k] for k in after} == {"total": 2, "eligible": 2, "skipped": 0}


@pytest.mark.parametrize(
    "photometric,bits,syntax,flag",
    [
        ("MONOCHROME2", 12, None, ()),
        ("MONOCHROME1", 16, None, ()),
        ("MONOCHROME2", 8, "jpeg-baseline", ("-xy",)),
        ("MONOCHROME1", 12, "jpeg-ls", ("-xt",)),
        ("MONOCHROME2", 16, "rle", ("-xr",)),
        ("MONOCHROME2", 12, "jpeg-lossless", ("-xs",)),
        ("MONOCHROME2", 12, "deflate", ("-xd",)),
    ],
)
def test_synthetic_radiographs_in_every_transfer_syntax(shared_node, tmp_path, photometric, bits, syntax, flag):
    node = shared_node
    make_cxr(
        tmp_path / "img.dcm",
        modality="CR" if bits == 16 else "DX",
        photometric=photometric,
        bits_stored=bits,
        rows=128,
        cols=96,
    )
    path = compress(tmp_path / "img.dcm", syntax) if syntax else tmp_path / "img.dcm"
    sent = pydicom.dcmread(path)
    ok(node.storescu(path, extra=flag))
    row = by_sop(node)[sent.SOPInstanceUID]  # lossy compression gives the copy a new UID
    assert row["eligible"] == 1
    stored = pydicom.dcmread(row["path"])
    assert stored.file_meta.TransferSyntaxUID == sent.file_meta.TransferSyntaxUID
    assert stored.pixel_array.tolist() == sent.pixel_array.tolist()


@pytest.mark.parametrize("max_pdu", [0, 16384])
def test_large_radiographs_arrive_intact_in_many_pdus(node_factory, tmp_path, max_pdu):
    """Multi-megabyte images arrive in many P-DATA PDUs (128 KB from storescu when the node sets no limit, 16 KB
    with a limit): every byte of every data set ends up in the spool, over dcmtk and over pynetdicom."""
    node = node_factory(node={"max_pdu_bytes": max_pdu})
    rng = np.random.default_rng(max_pdu)
    files = []
    for i, size in enumerate((1024, 1536, 777)):
        pixels = rng.integers(0, 4096, (size, size + 3), dtype=np.uint16)
        files.append(make_cxr(tmp_path / f"{i}.dcm", rows=size, cols=size + 3, pixels=pixels))
    ok(node.storescu(tmp_path / "0.dcm", tmp_path / "1.dcm"))
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(DigitalXRayImageStorageForPresentation, files[2].file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title, max_pdu=max_pdu or 16382)
    assert assoc.is_established
    assert assoc.send_c_store(tmp_path / "2.dcm").Status == 0x0000
    assoc.release()
    rows = by_sop(node)
    assert len(rows) == 3
    for i, original in enumerate(files):
        stored = pydicom.dcmread(rows[original.SOPInstanceUID]["path"])
        assert stored.PixelData == original.PixelData, f"file {i}"
        assert stored == original  # every element, not only the pixels


def test_non_chest_and_lateral_are_stored_but_skipped_with_reason(shared_node, tmp_path):
    node = shared_node
    before, mark = node.status()["instances"], node.log_mark()
    hand = make_cxr(tmp_path / "hand.dcm", body_part="HAND")
    lateral = make_cxr(tmp_path / "lat.dcm", view="LL")
    ok(node.storescu(tmp_path / "hand.dcm", tmp_path / "lat.dcm"))
    rows = by_sop(node)
    assert rows[hand.SOPInstanceUID]["eligible"] == 0
    assert "body part HAND" in rows[hand.SOPInstanceUID]["skip_reason"]
    assert rows[lateral.SOPInstanceUID]["eligible"] == 0
    assert "view position LL is not frontal" in rows[lateral.SOPInstanceUID]["skip_reason"]
    assert "skipped: view position LL" in node.log(mark)
    after = node.status()["instances"]
    assert {k: after[k] - before[k] for k in after} == {"total": 2, "eligible": 0, "skipped": 2}
    assert jobs_of(node, hand.StudyInstanceUID, lateral.StudyInstanceUID) == []  # nothing to analyse: no job
    assert Path(rows[hand.SOPInstanceUID]["path"]).exists()


@pytest.mark.filterwarnings("ignore:Invalid value for VR DA")  # the nonsense date is made on purpose
def test_children_are_stored_but_not_analysed(shared_node, node_factory, tmp_path):
    """Intended use: adults. A child by Patient's Age or by birth and study dates is skipped with the reason;
    an adult, and an image that does not say, are analysed."""
    node = shared_node
    mark = node.log_mark()
    cases = {
        "age": make_cxr(tmp_path / "a.dcm", PatientAge="006Y"),
        "dates": make_cxr(tmp_path / "b.dcm", PatientBirthDate="20200301"),  # study 2024-01-02: 3.8 years
        "months": make_cxr(tmp_path / "c.dcm", PatientAge="018M"),
        "adult": make_cxr(tmp_path / "d.dcm", PatientAge="045Y"),
        "unknown": make_cxr(tmp_path / "e.dcm", PatientBirthDate="", PatientAge=""),
        "nonsense": make_cxr(tmp_path / "f.dcm", PatientBirthDate="20991301"),
    }
    ok(node.storescu(*(tmp_path / f"{c}.dcm" for c in "abcdef")))
    rows = by_sop(node)
    reason = {name: rows[ds.SOPInstanceUID]["skip_reason"] for name, ds in cases.items()}
    assert reason["age"].startswith("patient age 6.0 years is below selection.min_patient_age_years (18)")
    assert reason["dates"].startswith("patient age 3.8 years") and reason["months"].startswith("patient age 1.5")
    assert reason["adult"] is None and reason["unknown"] is None and reason["nonsense"] is None
    assert "20991301" not in node.log(mark) and "20200301" not in node.log(mark)  # birth dates are patient data
    off = node_factory(selection={"min_patient_age_years": None})
    ok(off.storescu(tmp_path / "a.dcm"))
    assert by_sop(off)[cases["age"].SOPInstanceUID]["eligible"] == 1


@pytest.mark.parametrize(
    "garbage,code,comment",
    [
        (b"\x08\x00\x16\x00ZZ\x04\x00abcd", 0xC210, "cannot be decoded"),  # unknown VR
        (b"\x08\x00\x15\x11SQ\x00\x00\xff\xff\xff\xff\x01\x02\x03\x04\x05", 0xC210, "cannot be decoded"),  # broken SQ
        (b"\x08\x00\x16\x00UI\xff\xff" + b"\x01" * 40, 0xC210, "ends inside SOPClassUID"),  # length past the end
    ],
)
def test_malformed_dataset_gets_a_clear_status_and_node_keeps_serving(
    shared_node, tmp_path, monkeypatch, garbage, code, comment
):
    from pynetdicom import _config

    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)  # send the file's bytes as they are
    node = shared_node
    before, mark = total(node), node.log_mark()
    make_cxr(tmp_path / "good.dcm")
    # Valid file meta, garbage data set: the SCU streams the bytes as they are.
    raw = (tmp_path / "good.dcm").read_bytes()
    meta_end = raw.index(b"\x08\x00\x05\x00")  # first data set element (0008,0005)
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(raw[:meta_end] + garbage)
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(DigitalXRayImageStorageForPresentation)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title)
    assert assoc.is_established
    status = assoc.send_c_store(bad)
    assert status.Status == code, hex(status.Status)  # a failure senders do not retry: the data is bad
    assert comment in status.ErrorComment
    assert assoc.send_c_store(tmp_path / "good.dcm").Status == 0x0000  # the same association still works
    assoc.release()
    ok(node.storescu(tmp_path / "good.dcm"))  # and new ones too
    assert node.proc.poll() is None
    assert total(node) == before + 1  # the good one, once
    assert "Traceback" not in node.log(mark)


def test_missing_study_uid_refused(shared_node, tmp_path):
    node = shared_node
    ds = make_cxr(rows=32, cols=32)
    del ds.StudyInstanceUID
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(DigitalXRayImageStorageForPresentation)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title)
    status = assoc.send_c_store(ds)
    assoc.release()
    assert status.Status == 0xA900 and "StudyInstanceUID" in status.ErrorComment  # does not match its IOD


def test_uids_that_cannot_file_an_instance_are_refused_with_their_reason(shared_node, tmp_path):
    node = shared_node
    before = total(node)
    # the data set's SOP Instance UID is not the one the command announced (the file meta's)
    ds = make_cxr(tmp_path / "mismatch.dcm", rows=32, cols=32)
    uid = ds.SOPInstanceUID
    other = uid[:-1] + ("1" if uid[-1] != "1" else "2")
    raw = (tmp_path / "mismatch.dcm").read_bytes()
    (tmp_path / "mismatch.dcm").write_bytes(raw.replace(uid.encode(), other.encode(), 1))  # the file meta's only
    status = send_file(node, tmp_path / "mismatch.dcm")
    assert status.Status == 0xA900 and "differs from the command" in status.ErrorComment
    # no SOP Instance UID in the data set: refused, not filed under the command's UID
    ds = make_cxr(rows=32, cols=32)
    del ds.SOPInstanceUID
    ds.save_as(tmp_path / "no_sop.dcm", enforce_file_format=True)
    status = send_file(node, tmp_path / "no_sop.dcm")
    assert status.Status == 0xA900 and "missing SOPInstanceUID" in status.ErrorComment
    # a UID with letters, and one of 70 characters
    for bad in ("1.2.826.0.1.3680043.abc", "1." + "2" * 68):
        ds = make_cxr(rows=32, cols=32, study_uid=bad)
        ds.save_as(tmp_path / "bad_uid.dcm", enforce_file_format=True)
        status = send_file(node, tmp_path / "bad_uid.dcm")
        assert status.Status == 0xC212 and "invalid StudyInstanceUID" in status.ErrorComment, hex(status.Status)
    # leading zeros in a component: not valid, but written by old modalities; accepted
    old = make_cxr(rows=32, cols=32, study_uid="1.2.840.113619.2.55.3.604688.01")
    old.save_as(tmp_path / "old.dcm", enforce_file_format=True)
    assert send_file(node, tmp_path / "old.dcm").Status == 0x0000
    assert total(node) == before + 1 and old.SOPInstanceUID in by_sop(node)
    assert node.proc.poll() is None


def test_calling_and_called_ae_checks(node_factory, tmp_path):
    node = node_factory(node={"allowed_calling_aets": ["PACS"]})
    make_cxr(tmp_path / "a.dcm")
    rejected = node.storescu(tmp_path / "a.dcm", calling="INTRUDER")
    assert rejected.returncode != 0 and "Association Rejected" in rejected.stderr
    wrong_called = node.storescu(tmp_path / "a.dcm", calling="PACS", called="SOMEONE_ELSE")
    assert wrong_called.returncode != 0 and "Called AE Title Not Recognized" in wrong_called.stderr
    assert node.status()["instances"]["total"] == 0
    ok(node.storescu(tmp_path / "a.dcm", calling="PACS"))
    assert node.status()["instances"]["total"] == 1


def test_same_instance_twice_is_stored_once(shared_node, tmp_path):
    node = shared_node
    before = total(node)
    ds = make_cxr(tmp_path / "a.dcm")
    ok(node.storescu(tmp_path / "a.dcm"))
    ok(node.storescu(tmp_path / "a.dcm"))
    assert total(node) == before + 1
    assert len(spool_files_of(node, ds.StudyInstanceUID)) == 1


def test_disk_watermark_answers_out_of_resources(node_factory, tmp_path):
    node = node_factory(storage={"min_free_disk_mb": 10**12})
    ds = make_cxr(rows=32, cols=32)
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(DigitalXRayImageStorageForPresentation)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title)
    status = assoc.send_c_store(ds)
    assoc.release()
    assert status.Status == 0xA700
    assert node.status()["instances"]["total"] == 0


def test_four_parallel_associations_of_fifty(shared_node, tmp_path):
    node = shared_node
    before = total(node)
    batches, studies = [], []
    for b in range(4):
        study = generate_uid()
        studies.append(study)
        files = []
        for i in range(50):
            p = tmp_path / f"b{b}" / f"{i}.dcm"
            make_cxr(p, rows=64, cols=64, study_uid=study, sop_uid=generate_uid(), modality="CR")
            files.append(p)
        batches.append(files)
    # a fifth association re-sends batch 0 concurrently: duplicates must still be stored once
    with ThreadPoolExecutor(5) as pool:
        results = list(pool.map(lambda files: node.storescu(*files), batches + [batches[0]]))
    for r in results:
        ok(r)
    rows = [r for r in instances(node) if r["study_uid"] in studies]
    assert len(rows) == 200 and total(node) == before + 200
    assert len({r["sop_instance_uid"] for r in rows}) == 200
    assert sum(len(spool_files_of(node, s)) for s in studies) == 200
    queued = lambda: [j["state"] for j in jobs_of(node, *studies)] == ["queued"] * 4
    assert wait_for(queued, 30, what="4 study jobs")


def test_sigterm_shuts_down_cleanly(node_factory):
    node = node_factory()
    assert node.stop() == 0
    assert "stopped" in node.log()


def test_status_json_documented_shape(node_factory, tmp_path):
    node = node_factory()
    make_cxr(tmp_path / "a.dcm")
    ok(node.storescu(tmp_path / "a.dcm"))
    st = wait_for(lambda: (s := node.status())["jobs"]["queued"] == 1 and s, 20, what="job queued")
    assert set(st) == {
        "instances",
        "studies",
        "jobs",
        "deliveries",
        "workers",
        "urgent_queued_jobs",
        "oldest_queued_job_age_s",
        "purged",
        "last_activity",
        "nodes",
    }
    assert st["workers"] == {"alive": 0, "stale": 0, "dead": 0} and st["oldest_queued_job_age_s"] >= 0
    assert st["urgent_queued_jobs"] == 0  # a routine study
    assert st["purged"] == {"studies": 0, "instances": 0, "bytes": 0, "last_at": None}
    assert st["studies"] == {"total": 1, "receiving": 0, "complete": 1}
    assert set(st["jobs"]) == {"total", "queued", "running", "done", "failed"}
    assert set(st["deliveries"]) == {"total", "pending", "delivered", "failed", "held"}
    assert st["last_activity"]["instance_received_at"].startswith("20")
    ((me,),) = [st["nodes"]]  # the serve instances on this database: this one, leading
    assert (me["state"], me["role"], me["dicom"]) == ("running", "leader", f"127.0.0.1:{node.port}")
    node.stop()
    age = st.pop("oldest_queued_job_age_s")  # the one value that grows by itself
    later = node.status()
    assert later.pop("oldest_queued_job_age_s") >= age
    assert [(n["state"], n["role"]) for n in later.pop("nodes")] == [("stopped", "follower")]
    st.pop("nodes")
    assert later == st  # read straight from storage: works with the node stopped
    printed = json.loads(node.cli("status", "--json").stdout)  # and the command prints exactly that
    assert printed.pop("oldest_queued_job_age_s") >= age and printed.pop("nodes") and printed == st


def test_no_phi_in_logs(node_factory, tmp_path):
    node = node_factory(logging={"level": "DEBUG"})
    canaries = {
        "PatientName": "CANARY^PHIXQZ",
        "PatientID": "CANARYID7731",
        "AccessionNumber": "CANACC9913",
        "PatientBirthDate": "19010203",
        "StudyDescription": "CANARYDESC",
    }
    make_cxr(
        tmp_path / "a.dcm",
        patient_name=canaries["PatientName"],
        patient_id=canaries["PatientID"],
        AccessionNumber=canaries["AccessionNumber"],
        PatientBirthDate=canaries["PatientBirthDate"],
        StudyDescription=canaries["StudyDescription"],
    )
    make_cxr(tmp_path / "b.dcm", patient_name=canaries["PatientName"], view="LL")
    ok(node.storescu(tmp_path / "a.dcm", tmp_path / "b.dcm"))
    wait_for(lambda: node.status()["jobs"]["total"] == 1, 20, what="job")
    status_text = node.cli("status").stdout + node.cli("status", "--json").stdout
    node.stop()
    log = node.log()
    assert "C-STORE" in log  # the log is not simply empty
    for value in canaries.values():
        assert value not in log, f"{value} leaked into the log"
        assert value not in status_text


@pytest.mark.slow  # a worker process loads models
def test_no_phi_in_logs_when_odd_headers_go_through_the_worker(node_factory, tmp_path):
    """Invalid dates, ages, names and character sets make pydicom and highdicom complain, quoting the value: none
    of that may reach the node's log, and the study still gets its result."""
    clf, det = make_tiny_models(tmp_path / "models", p_abnormal=0.9)
    node = node_factory(
        logging={"level": "DEBUG"},
        workers={"count": 1},
        inference={"models": {"classifier": str(clf), "detector": str(det)}},
    )
    make_cxr(
        tmp_path / "a.dcm",
        patient_name=["CANARY^ONE", "CANARY^TWO"],
        patient_id="CANARYID0042",
        PatientBirthDate="CANARYBD",
        PatientAge="CANA",
        StudyDate="2026CANA",
        SpecificCharacterSet="ISO_IR 999",
    )
    ok(node.storescu(tmp_path / "a.dcm"))
    wait_for(lambda: node.status()["jobs"]["done"] == 1, 120, what="job done despite the odd header")
    node.stop()
    log = node.log()
    assert "job 1 done" in log
    for value in ("CANARY", "CANA"):
        assert value not in log, f"{value} leaked into the log"


def test_a_radiograph_that_claims_our_manufacturer_is_still_analysed(shared_node, tmp_path):
    node = shared_node
    before = node.status()["instances"]
    ds = make_cxr(tmp_path / "a.dcm", Manufacturer="dicom-node")  # a modality may say anything here
    ok(node.storescu(tmp_path / "a.dcm"))
    after = node.status()["instances"]
    assert {k: after[k] - before[k] for k in after} == {"total": 1, "eligible": 1, "skipped": 0}
    assert by_sop(node)[ds.SOPInstanceUID]["eligible"] == 1


@pytest.fixture
def small_filesystem(tmp_path):
    """A 4 MB tmpfs (needs root, as CI and the dev machine have): a disk that really fills up."""
    mount = tmp_path / "small"
    mount.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs for the full-disk test: {r.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_answers_0xA700_and_the_association_lives_on(node_factory, tmp_path, small_filesystem):
    node = node_factory(
        storage={
            "root": str(small_filesystem),
            "database_url": f"sqlite:///{tmp_path / 'db.sqlite3'}",
            "min_free_disk_mb": 0,  # no watermark: the disk itself runs out
        }
    )
    big = make_cxr(rows=2048, cols=2048, bits_stored=16)  # 8 MB: does not fit
    small = make_cxr(rows=32, cols=32)
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(DigitalXRayImageStorageForPresentation)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title)
    assert assoc.is_established
    status = assoc.send_c_store(big)
    assert status.Status == 0xA700 and status.ErrorComment == "out of disk space", status
    assert assoc.is_established  # not aborted: the sender may retry later
    assert assoc.send_c_store(small).Status == 0x0000  # what fits is stored
    assoc.release()
    assert [p for p in (small_filesystem / "tmp").rglob("*") if p.is_file()] == []  # the partial file is gone
    assert node.status()["instances"]["total"] == 1
    assert "Traceback" not in node.log()


@pytest.mark.slow  # check-config loads the shipped models
def test_check_config_names_the_bad_key(tmp_path):
    import sys

    bad = tmp_path / "bad.yaml"
    bad.write_text("node:\n  port: 70000\nstudies:\n  stable_after: 3\nstorage:\n  database_url: mysql://db/x\n")
    r = subprocess.run(
        [sys.executable, "-m", "dicom_node", "check-config", "--config", str(bad)], capture_output=True, text=True
    )
    assert r.returncode == 2
    assert "node.port" in r.stderr and "studies.stable_after" in r.stderr and "Traceback" not in r.stderr
    assert "storage.database_url" in r.stderr and "postgresql" in r.stderr
    repo_cfg = Path(__file__).resolve().parents[1] / "config.yaml"
    r = subprocess.run(
        [sys.executable, "-m", "dicom_node", "check-config", "--config", str(repo_cfg)], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
