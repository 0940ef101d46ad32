"""Workers and the sender: results reach a real DICOM peer (dcmtk storescp), failures are classified and retried.

The node runs as a real process. Tests of the whole flow give it a worker process and tiny random-weight models;
tests of the sender alone give it none: the result is written through the store, as a worker writes it.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from dicom_node.outputs.validate import dsrdump
from storage.jobs import ResultSpec
from support.dcmtk import DcmtkStoreSCP
from support.dicom_factory import make_cxr
from support.node import NodeProcess, free_port, wait_for

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"
GSPS_CLASS = "1.2.840.10008.5.1.4.1.1.11.1"


@pytest.fixture
def pacs(tmp_path):
    scps = []

    def make(**kw) -> DcmtkStoreSCP:
        scp = DcmtkStoreSCP(tmp_path / f"pacs{len(scps)}", **kw)
        scps.append(scp)
        return scp

    yield make
    for s in scps:
        s.stop()


def result_node(node_factory, models, port, outputs=("sr", "sc", "gsps"), **over):
    cfg = dict(
        workers={"count": 1, "job_lease_s": 5},
        inference={"models": models},
        destinations=[
            {
                "name": "pacs",
                "ae_title": "PACS",
                "host": "127.0.0.1",
                "port": port,
                "outputs": list(outputs),
                "mode": "live",
            }
        ],
        delivery={"backoff_initial_s": 0.5, "backoff_max_s": 1.0, "connect_timeout_s": 3},
    )
    cfg.update(over)
    return node_factory(**cfg)


def deliveries(node) -> list[dict]:
    return node.rows("SELECT * FROM deliveries")


@pytest.mark.slow  # a worker process loads models
def test_study_results_arrive_at_pacs(node_factory, models, pacs, tmp_path):
    scp = pacs().start()
    node = result_node(node_factory, models, scp.port)
    study = generate_uid()
    pa = make_cxr(tmp_path / "pa.dcm", study_uid=study, view="PA", rows=300, cols=240)
    ap = make_cxr(tmp_path / "ap.dcm", study_uid=study, view="AP", modality="CR", photometric="MONOCHROME1")
    lat = make_cxr(tmp_path / "lat.dcm", study_uid=study, view="LL")
    r = node.storescu(tmp_path / "pa.dcm", tmp_path / "ap.dcm", tmp_path / "lat.dcm")
    assert r.returncode == 0, r.stderr
    st = wait_for(lambda: (s := node.status())["deliveries"]["delivered"] == 5 and s, 180, what="5 deliveries")
    assert st["jobs"]["done"] == 1 and st["deliveries"]["failed"] == 0
    got = scp.received()
    by_class = {c: [d for d in got if d.SOPClassUID == c] for c in (SR_CLASS, SC_CLASS, GSPS_CLASS)}
    assert [len(by_class[c]) for c in (SR_CLASS, SC_CLASS, GSPS_CLASS)] == [1, 2, 2]
    sr = by_class[SR_CLASS][0]
    assert sr.StudyInstanceUID == study and sr.PatientID == pa.PatientID
    assert sr.SeriesInstanceUID not in {pa.SeriesInstanceUID, ap.SeriesInstanceUID}
    assert sr.CompletionFlag == "COMPLETE" and sr.VerificationFlag == "UNVERIFIED"
    referenced = {
        ref.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        for ref in sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
    }
    evidence = {
        i.ReferencedSOPInstanceUID
        for s in sr.CurrentRequestedProcedureEvidenceSequence
        for ser in s.ReferencedSeriesSequence
        for i in ser.ReferencedSOPSequence
    }
    assert evidence == {pa.SOPInstanceUID, ap.SOPInstanceUID} and referenced <= evidence  # lateral not analysed
    for sc in by_class[SC_CLASS]:
        assert sc.StudyInstanceUID == study and sc.BurnedInAnnotation == "YES"
        assert sc.PhotometricInterpretation == "RGB"
        assert lat.SOPInstanceUID != sc.SourceImageSequence[0].ReferencedSOPInstanceUID
    # every object arrived exactly once
    assert len({d.SOPInstanceUID for d in got}) == len(got) == 5


def sr_object(source: Dataset) -> tuple[Dataset, bytes]:
    """A small SR instance of ``source``'s study, as the bytes a worker stores (what the sender sends)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = SR_CLASS
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.PatientID = source.StudyInstanceUID, source.PatientID
    ds.SeriesInstanceUID, ds.Modality = generate_uid(), "SR"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return ds, buf.getvalue()


def sender_node(node_factory, port, tmp_path) -> tuple[NodeProcess, Dataset]:
    """A node with no worker (the sender needs no models) and one study whose SR result waits for delivery to
    ``port``: the study is sent over DICOM, and its job is taken and finished through the store with the SR, as a
    worker does it. Returns (node, the SR)."""
    node = node_factory(
        destinations=[
            {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": port, "outputs": ["sr"], "mode": "live"}
        ],
        delivery={"backoff_initial_s": 0.5, "backoff_max_s": 1.0, "connect_timeout_s": 3},
    )
    image = make_cxr(tmp_path / "a.dcm")
    assert node.storescu(tmp_path / "a.dcm").returncode == 0
    store = node.store()
    job = wait_for(lambda: store.claim_job("test-worker", 60), 30, what="the study's job")
    sr, data = sr_object(image)
    result = ResultSpec("sr", sr.SOPInstanceUID, SR_CLASS, sr.SeriesInstanceUID, None, data, ("pacs",))
    store.finish_job(job.id, "test-worker", [result])
    return node, sr


def retrying_node(node_factory, port, tmp_path, what: str):
    """A node whose one SR delivery to ``port`` has been tried at least twice and is still pending.
    Returns (node, the delivery row, the SR)."""
    node, sr = sender_node(node_factory, port, tmp_path)
    wait_for(lambda: any(d["attempts"] >= 2 for d in deliveries(node)), 60, what=what)
    d = deliveries(node)[0]
    assert d["state"] == "pending"
    return node, d, sr


def test_transient_failure_is_retried_until_delivered_once(node_factory, pacs, tmp_path):
    port = free_port()
    node, d, sr = retrying_node(node_factory, port, tmp_path, "retries while PACS is down")
    assert "cannot connect" in d["last_error"]
    scp = pacs(port=port).start()
    st = wait_for(lambda: (s := node.status())["deliveries"]["delivered"] == 1 and s, 60, what="delivery after PACS")
    assert st["deliveries"]["pending"] == 0  # nothing left that could be sent again
    assert [d.SOPInstanceUID for d in scp.received()] == [sr.SOPInstanceUID]  # storescp writes it, then answers
    assert deliveries(node)[0]["last_error"] is None


def test_rejected_association_fails_at_once_and_retry_requeues(node_factory, pacs, tmp_path):
    refusing = pacs(refuse=True).start()
    node, sr = sender_node(node_factory, refusing.port, tmp_path)
    wait_for(lambda: node.status()["deliveries"]["failed"] == 1, 60, what="permanent failure")
    d = deliveries(node)[0]  # no retry storm: failed at the first attempt, and the sender only sends pending ones
    assert d["state"] == "failed" and d["attempts"] == 1 and "rejected" in d["last_error"]
    refusing.stop()
    scp = pacs(port=refusing.port).start()
    out = node.cli("retry").stdout
    assert "re-queued 1 failed delivery" in out
    wait_for(lambda: node.status()["deliveries"]["delivered"] == 1, 60, what="delivery after retry")
    assert [d.SOPInstanceUID for d in scp.received()] == [sr.SOPInstanceUID]


@pytest.mark.slow  # a worker process loads models
def test_failed_job_is_recorded_and_worker_goes_on(node_factory, models, pacs, tmp_path):
    scp = pacs().start()
    node = result_node(node_factory, models, scp.port, outputs=("sr",))
    bad = make_cxr(rows=64, cols=64)
    bad.PixelData = bad.PixelData[:100]  # header says 64x64x16 bit; the data is truncated
    bad.save_as(tmp_path / "bad.dcm", enforce_file_format=True)
    make_cxr(tmp_path / "good.dcm")
    assert node.storescu(tmp_path / "bad.dcm").returncode == 0
    wait_for(lambda: node.status()["jobs"]["failed"] == 1, 180, what="failed job")
    assert node.storescu(tmp_path / "good.dcm").returncode == 0
    wait_for(lambda: node.status()["deliveries"]["delivered"] == 1, 120, what="next job delivered")
    reason = node.rows("SELECT reason FROM jobs WHERE state='failed'")[0]["reason"]
    assert "PixelDataError" in reason and "image 1 of 1" in reason


@pytest.mark.slow  # a worker process loads models
def test_one_undecodable_image_does_not_cost_the_study_its_result(node_factory, models, pacs, tmp_path):
    scp = pacs().start()
    node = result_node(node_factory, models, scp.port, outputs=("sr", "sc"))
    study = generate_uid()
    bad = make_cxr(rows=64, cols=64, study_uid=study)
    bad.PixelData = bad.PixelData[:100]  # truncated
    bad.save_as(tmp_path / "bad.dcm", enforce_file_format=True)
    good = make_cxr(tmp_path / "good.dcm", study_uid=study)
    assert node.storescu(tmp_path / "bad.dcm", tmp_path / "good.dcm").returncode == 0
    wait_for(lambda: node.status()["deliveries"]["delivered"] == 2, 180, what="SR + one SC")
    assert node.status()["jobs"]["failed"] == 0
    received = scp.received()
    (sr,) = [d for d in received if d.SOPClassUID == SR_CLASS]
    (sc,) = [d for d in received if d.SOPClassUID != SR_CLASS]
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == good.SOPInstanceUID
    (sr_file,) = [p for p in scp.out.iterdir() if p.name.endswith("." + sr.SOPInstanceUID)]
    text = dsrdump(sr_file, "+Pl")
    assert "1 of 2 images not analysable (pixel data could not be decoded" in text
    assert '(82334004,SCT,"Indeterminate")' in text


@pytest.mark.slow  # a worker process loads models
def test_reanalyze_and_own_outputs_are_ignored(node_factory, models, pacs, tmp_path):
    scp = pacs().start()
    node = result_node(node_factory, models, scp.port, outputs=("sr", "sc"))
    ds = make_cxr(tmp_path / "a.dcm")
    assert node.storescu(tmp_path / "a.dcm").returncode == 0
    wait_for(lambda: node.status()["deliveries"]["delivered"] == 2, 180, what="first results")
    # a PACS that routes everything back: the node stores its own outputs but never analyses them
    outputs = sorted(p for p in scp.out.iterdir() if p.is_file())
    r = node.storescu(*outputs, extra=("-R",))
    assert r.returncode == 0, r.stderr  # storescu returns once every instance is committed
    st = node.status()
    assert st["instances"] == {"total": 3, "eligible": 1, "skipped": 2}
    assert st["studies"]["receiving"] == 0  # skipped instances arm no study timer: no job can follow
    assert st["jobs"]["total"] == 1
    assert "output of this node" in node.log()
    # explicit re-analysis: a new job and a new SR
    out = node.cli("reanalyze", ds.StudyInstanceUID).stdout
    assert "queued job 2" in out
    wait_for(lambda: node.status()["deliveries"]["delivered"] == 4, 120, what="re-analysis results")
    srs = [d for d in scp.received() if d.SOPClassUID == SR_CLASS]
    assert len(srs) == 2 and srs[0].SOPInstanceUID != srs[1].SOPInstanceUID


def test_transient_rejection_is_retried(node_factory, tmp_path):
    """A PACS at its association limit rejects with 'rejected-transient': the node retries instead of failing."""
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import Verification

    received = []
    pacs_ae = AE(ae_title="PACS")
    pacs_ae.maximum_associations = 1
    pacs_ae.add_supported_context(Verification)
    pacs_ae.add_supported_context(SR_CLASS)
    port = free_port()
    server = pacs_ae.start_server(
        ("127.0.0.1", port),
        block=False,
        evt_handlers=[(evt.EVT_C_STORE, lambda event: received.append(event.request.AffectedSOPInstanceUID) or 0x0000)],
    )
    try:
        holder = AE(ae_title="HOLDER")
        holder.add_requested_context(Verification)
        held = holder.associate("127.0.0.1", port, ae_title="PACS")  # takes the PACS's only association slot
        assert held.is_established
        node, d, sr = retrying_node(node_factory, port, tmp_path, "retries while PACS is full")
        assert "rejected (transient)" in d["last_error"]
        held.release()
        wait_for(lambda: node.status()["deliveries"]["delivered"] == 1, 60, what="delivery once a slot is free")
        assert received == [sr.SOPInstanceUID]
    finally:
        server.shutdown()


@pytest.mark.slow  # a worker process loads models
def test_whole_flow_on_postgresql(node_factory, models, pacs, tmp_path, postgres_url):
    """PostgreSQL is a configuration change away: storage.database_url pointed at a server, nothing else."""
    scp = pacs().start()
    node = result_node(node_factory, models, scp.port, outputs=("sr", "sc"), storage={"database_url": postgres_url})
    study = generate_uid()
    make_cxr(tmp_path / "pa.dcm", study_uid=study, view="PA")
    make_cxr(tmp_path / "lat.dcm", study_uid=study, view="LL")
    r = node.storescu(tmp_path / "pa.dcm", tmp_path / "lat.dcm", tmp_path / "pa.dcm")  # one sent twice
    assert r.returncode == 0, r.stderr
    st = wait_for(lambda: (s := node.status())["deliveries"]["delivered"] == 2 and s, 180, what="results")
    assert st["instances"] == {"total": 2, "eligible": 1, "skipped": 1}
    assert st["jobs"]["done"] == 1 and st["deliveries"]["failed"] == 0
    assert sorted(d.Modality for d in scp.received()) == ["OT", "SR"]
    assert not (Path(node.config["storage"]["root"]) / "dicom-node.sqlite3").exists()
