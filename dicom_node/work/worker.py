"""Analysis workers: claim a queued study job, run the pipeline on its images, encode SR/SC/GSPS, and hand the
result objects with one delivery per destination to storage, in one commit.

Workers run in their own processes (started by ``dicom-node serve``, or alone with ``dicom-node worker``) so
inference never stalls an association. A worker holds a lease on its job and renews it while it works; a job
whose worker died (kill -9) is taken over when the lease runs out. A job that fails (undecodable pixels, a
model error) is marked failed with the reason and the worker goes on with the next one.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from inference.pipeline import Pipeline
from inference.types import Prediction
from storage import Store
from storage.errors import StaleJobError
from storage.repository import JobInfo, ResultSpec

from dicom_node import __version__
from dicom_node.config import Config
from dicom_node.errors import PixelDataError
from dicom_node.outputs.gsps import build_gsps
from dicom_node.outputs.identity import NodeIdentity, derived_uid
from dicom_node.imaging.pixels import decode_image, read_dataset
from dicom_node.outputs.sc import build_sc
from dicom_node.outputs.sr import build_sr

log = logging.getLogger(__name__)


def node_identity(config: Config, pipeline: Pipeline) -> NodeIdentity:
    return NodeIdentity(
        device_observer_uid=derived_uid("dicom-node device observer", config.node.ae_title),
        software_version=__version__, institution=config.outputs.institution_name,
        station_name=config.node.ae_title, models=pipeline.models)


def load_pipeline(config: Config) -> Pipeline:
    m = config.inference.models
    if m.threads:
        Pipeline.limit_threads(m.threads)
    return Pipeline.from_files(m.classifier, m.detector, fusion=config.inference.fusion, device=m.device)


@dataclass
class _Analysed:
    sop_uid: str
    header: Dataset
    image01: object                 # as decoded: Rows x Columns, or smaller (a JPEG 2000 resolution level)
    window: tuple[float, float] | None
    prediction: Prediction          # boxes in source pixels (SR, GSPS)
    shown: Prediction               # the same on image01's pixels (the Secondary Capture is drawn on image01)


class Analyzer:
    """Turns one claimed job into result objects (pure: no database writes)."""

    def __init__(self, config: Config, pipeline: Pipeline):
        self.config = config
        self.pipeline = pipeline
        self.identity = node_identity(config, pipeline)

    def wanted(self, kind: str) -> tuple[str, ...]:
        return tuple(d.name for d in self.config.destinations if kind in d.outputs)

    def analyse(self, job: JobInfo) -> tuple[list[ResultSpec], float]:
        analysed: list[_Analysed] = []
        pipeline_s = 0.0
        for n, (sop_uid, path) in enumerate(job.instances, 1):
            try:
                ds = read_dataset(path)
                image01, window = decode_image(ds, at_least=self.pipeline.working_size)
            except PixelDataError as exc:
                raise PixelDataError(f"image {n} of {len(job.instances)}: {exc}") from exc
            t0 = time.perf_counter()
            shown = self.pipeline.run(image01)
            pipeline_s += time.perf_counter() - t0
            del ds.PixelData   # the encoders need the header only
            analysed.append(_Analysed(sop_uid, ds, image01, window, shown.rescaled((ds.Rows, ds.Columns)), shown))
        return self._encode(analysed), pipeline_s

    def _encode(self, analysed: list[_Analysed]) -> list[ResultSpec]:
        out = self.config.outputs
        ident = self.identity
        results: list[ResultSpec] = []
        sr_series, sc_series, pr_series = generate_uid(), generate_uid(), generate_uid()
        sr_uid = generate_uid()
        sr = build_sr([(a.header, a.prediction) for a in analysed], series_uid=sr_series, sop_uid=sr_uid,
                      series_number=out.series_number_sr, instance_number=1, identity=ident)
        results.append(_spec("sr", sr, None, self.wanted("sr")))
        sc_dest, pr_dest = self.wanted("sc"), self.wanted("gsps")
        for n, a in enumerate(analysed, 1):
            if sc_dest:
                sc = build_sc(a.header, a.image01, a.shown, series_uid=sc_series, sop_uid=generate_uid(),
                              series_number=out.series_number_sc, instance_number=n, identity=ident)
                results.append(_spec("sc", sc, a.sop_uid, sc_dest))
            if pr_dest:
                pr = build_gsps(a.header, a.prediction, series_uid=pr_series, sop_uid=generate_uid(),
                                series_number=out.series_number_gsps, instance_number=n, identity=ident,
                                window=a.window)
                results.append(_spec("gsps", pr, a.sop_uid, pr_dest))
        return results


def _spec(kind: str, ds: Dataset, source_sop_uid: str | None, destinations: tuple[str, ...]) -> ResultSpec:
    from io import BytesIO
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return ResultSpec(kind=kind, sop_instance_uid=str(ds.SOPInstanceUID), sop_class_uid=str(ds.SOPClassUID),
                      series_uid=str(ds.SeriesInstanceUID), source_sop_uid=source_sop_uid, data=buf.getvalue(),
                      destinations=destinations)


class Worker:
    def __init__(self, config: Config, store: Store, analyzer: Analyzer, name: str):
        self.config = config
        self.store = store
        self.analyzer = analyzer
        self.name = name
        self.stopping = threading.Event()

    def run_once(self) -> bool:
        """Process one job if there is one; returns whether a job was processed."""
        lease_s = self.config.workers.job_lease_s
        job = self.store.claim_job(self.name, lease_s)
        if job is None:
            return False
        log.info("job %d: analysing %d image(s) (attempt %d)", job.id, len(job.instances), job.attempts)
        t0 = time.perf_counter()
        done = threading.Event()
        heartbeat = threading.Thread(target=self._renew, args=(job.id, lease_s, done), daemon=True)
        heartbeat.start()
        try:
            if not job.instances:
                raise PixelDataError("no eligible instances left in the study")
            results, pipeline_s = self.analyzer.analyse(job)
            self.store.finish_job(job.id, self.name, results, pipeline_s=pipeline_s)
        except StaleJobError as exc:
            log.warning("%s", exc)
            return True
        except Exception as exc:  # noqa: BLE001 - one bad job must not stop the worker
            reason = f"{type(exc).__name__}: {exc}"
            log.error("job %d failed: %s", job.id, reason)
            self.store.fail_job(job.id, self.name, reason)
        else:
            kinds = ", ".join(sorted({r.kind for r in results}))
            log.info("job %d done in %.2f s (pipeline %.2f s): %d result object(s) [%s]", job.id,
                     time.perf_counter() - t0, pipeline_s, len(results), kinds)
        finally:
            done.set()
            heartbeat.join()
        return True

    def _renew(self, job_id: int, lease_s: float, done: threading.Event) -> None:
        while not done.wait(max(lease_s / 3, 0.5)):
            try:
                self.store.renew_lease(job_id, self.name, lease_s)
            except Exception:  # noqa: BLE001 - a missed renewal only risks a takeover later
                log.warning("job %d: could not renew the lease", job_id)

    def run(self, parent_pid: int | None = None) -> None:
        poll = self.config.workers.poll_interval_s
        while not self.stopping.is_set():
            if parent_pid is not None and os.getppid() != parent_pid:
                log.warning("the node process is gone: worker stopping")
                return
            if not self.run_once():
                self.stopping.wait(poll)
