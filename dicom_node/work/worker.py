"""Analysis workers: claim a queued study job, let the :class:`Analyzer` turn it into SR/SC/GSPS, and hand the
result objects with one delivery per destination to storage, in one commit.

Workers run in their own processes (started by ``dicom-node serve``, or alone with ``dicom-node worker``) so
inference never stalls an association. A worker holds a lease on its job and renews it while it works; a job
whose worker died (kill -9) is taken over when the lease runs out. A job that fails (undecodable pixels, a
model error) is marked failed with the reason and the worker goes on with the next one; an unexpected error
(a bug) also leaves its traceback in the log. A failing database makes the worker wait and try again.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from dataclasses import replace

from dicom_node import audit
from dicom_node.config import Config
from dicom_node.errors import DicomNodeError, PixelDataError
from dicom_node.logs import safe_traceback
from dicom_node.work.analyzer import Analysis, Analyzer
from dicom_node.work.site_validation import sr_parameter
from storage import Store
from storage.errors import StaleJobError, StorageError
from storage.jobs import JobInfo

log = logging.getLogger(__name__)

STORAGE_RETRY_S = 5.0  # wait after a storage failure outside a job (database down, locked, full disk)
HEARTBEAT_S = 5.0  # how often a worker says it is alive (storage.jobs.WORKER_STALE_S: when it is not)


class Worker:
    def __init__(self, config: Config, store: Store, analyzer: Analyzer, name: str, models: str = ""):
        self.config = config
        self.store = store
        self.analyzer = analyzer
        self.name = name
        self.models = models  # what the heartbeat reports: the loaded models' versions
        self.current_job: int | None = None
        self.stopping = threading.Event()

    def _heartbeat(self) -> None:
        """Say "alive" (and which job) every HEARTBEAT_S until the worker stops; a storage failure skips a beat."""
        host = socket.gethostname()
        while True:
            self.store.spool.keep_tmp()  # this worker's tmp/ is in use (a leader never removes it), database or not
            try:
                self.store.sync_clock()  # leases are on the database's clock: follow this host's clock if it steps
                self.store.worker_heartbeat(self.name, os.getpid(), host, self.models, self.current_job)
            except StorageError as exc:
                log.warning("worker %s: heartbeat not recorded: %s", self.name, exc)
            if self.stopping.wait(HEARTBEAT_S):
                return

    def run_once(self) -> bool:
        """Process the next job if there is one (with ``workers.jobs_per_batch`` > 1, up to that many queued jobs
        whose images go through the networks together); returns whether a job was processed."""
        lease_s = self.config.workers.job_lease_s
        job = self.store.claim_job(self.name, lease_s)
        if job is None:
            return False
        jobs = [job]
        room = self.config.inference.models.batch_images
        while len(jobs) < self.config.workers.jobs_per_batch and sum(len(j.instances) for j in jobs) < room:
            more = self.store.claim_job(self.name, lease_s)
            if more is None:
                break
            jobs.append(more)
        self.current_job = job.id
        self._site_validation()
        for j in jobs:
            log.info("job %d: analysing %d image(s) (attempt %d)", j.id, len(j.instances), j.attempts)
        t0 = time.perf_counter()
        done = threading.Event()
        heartbeat = threading.Thread(target=self._renew, args=([j.id for j in jobs], lease_s, done), daemon=True)
        heartbeat.start()
        try:
            with_images = [j for j in jobs if j.instances]
            by_id = {j.id: o for j, o in zip(with_images, self.analyzer.analyse_many(with_images))}
            for j in jobs:
                outcome = by_id.get(j.id, PixelDataError("no eligible instances left in the study"))
                self._finish(j, outcome, t0)
        finally:
            done.set()
            heartbeat.join()
            self.current_job = None
        return True

    def _site_validation(self) -> None:
        """Put the loaded model pair's latest site validation into the SR's Algorithm Parameters (one indexed
        query per claim, so that a validation made while the node runs shows in the next SR)."""
        pipeline = self.analyzer.pipeline
        try:
            latest = self.store.latest_validation(pipeline.classifier.info.sha256, pipeline.detector.info.sha256)
        except StorageError as exc:  # keep what the last job said
            log.warning("worker %s: site validation not looked up: %s", self.name, exc)
            return
        text = sr_parameter(latest)
        if text != self.analyzer.identity.site_validation:
            self.analyzer.identity = replace(self.analyzer.identity, site_validation=text)

    def _finish(self, job: JobInfo, outcome: Analysis | Exception, t0: float) -> None:
        """Commit a job's results, or mark it failed with the reason."""
        try:
            if isinstance(outcome, Exception):
                raise outcome
            results, pipeline_s, images, priority = outcome
            self.store.finish_job(
                job.id,
                self.name,
                results,
                pipeline_s=pipeline_s,
                images=images,
                models=self.models or None,
                priority=priority.queue,
                priority_reasons="; ".join(priority.reasons) or None,
            )
        except StaleJobError as exc:
            log.warning("%s", exc)
            return
        except StorageError:
            raise  # the worker loop waits and retries; the job stays leased and is taken over or resumed
        except Exception as exc:  # noqa: BLE001 - one bad job must not stop the worker
            reason = f"{type(exc).__name__}: {exc}"
            if isinstance(exc, DicomNodeError):  # an expected failure: its message says it all
                log.error("job %d failed: %s", job.id, reason)
            else:  # a bug: keep where it happened (without patient data)
                log.error("job %d failed:\n%s", job.id, safe_traceback(exc))
            self.store.fail_job(job.id, self.name, reason)
            audit.event(
                "job_failed",
                job=job.id,
                study=audit.study_key(job.study_uid),
                reason=reason if isinstance(exc, DicomNodeError) else type(exc).__name__,
            )
            return
        audit.event(
            "job_done", job=job.id, study=audit.study_key(job.study_uid), results=len(results), priority=priority.level
        )
        kinds = ", ".join(sorted({r.kind for r in results}))
        log.info(
            "job %d done in %.2f s (pipeline %.2f s): %d result object(s) [%s]",
            job.id,
            time.perf_counter() - t0,
            pipeline_s,
            len(results),
            kinds,
        )

    def _renew(self, job_ids: list[int], lease_s: float, done: threading.Event) -> None:
        while not done.wait(max(lease_s / 3, 0.5)):
            for job_id in job_ids:
                try:
                    self.store.renew_lease(job_id, self.name, lease_s)
                except StorageError as exc:  # a missed renewal only risks a takeover later
                    log.warning("job %d: could not renew the lease (%s)", job_id, exc)

    def run(self, parent_pid: int | None = None) -> None:
        beats = threading.Thread(target=self._heartbeat, name=f"{self.name}-heartbeat", daemon=True)
        beats.start()
        try:
            self._loop(parent_pid)
        finally:
            self.stopping.set()
            beats.join(10)
            try:
                self.store.worker_stopped(self.name)
            except StorageError:
                pass

    def _loop(self, parent_pid: int | None) -> None:
        poll = self.config.workers.poll_interval_s
        while not self.stopping.is_set():
            if parent_pid is not None and os.getppid() != parent_pid:
                log.warning("the node process is gone: worker stopping")
                return
            try:
                worked = self.run_once()
            except StorageError as exc:  # the job (if any) stays leased and is taken over or resumed later
                log.error("worker %s: storage failure, retrying in %.0f s: %s", self.name, STORAGE_RETRY_S, exc)
                self.stopping.wait(STORAGE_RETRY_S)
                continue
            if not worked:
                self.stopping.wait(poll)
