"""Working backfill runs in ``serve``: :class:`Backfiller` searches the PACS for a run's studies (C-FIND) and pulls
them one C-MOVE each, to the node's own AE title, within the run's bounds.

The images arrive at the node's listener as ordinary C-STOREs: the same store, selection, study timers and
workers as routed studies. A pulled study is retrospective (its ``backfill_studies`` row says so): its results
are made and kept, never delivered.

Bounds, so that the PACS is never flooded (``backfill`` in config.yaml; a run may set its own): at most
``max_concurrent_moves`` moves at once, ``studies_per_hour`` moves started in any hour (counted in the database,
so a restart does not reset it), and only inside ``window`` (local time).

A **re-analysis fetch** (``dicom-node reanalyze`` of a study the node no longer holds: a run of one Study UID with
``deliver`` in its settings) goes before the backfill's moves and waits for neither ``window`` nor
``studies_per_hour`` (it counts towards the hour); ``max_concurrent_moves`` applies. Its study is analysed and its
results delivered as a live study's. When every instance it brought was one the node had a row for (its file was
gone), no study timer runs: the re-analysis is queued here once the move is done.

The source may instead be a DICOMweb archive (``backfill.source: {dicomweb: URL}``): the search is QIDO-RS and each
study is retrieved with WADO-RS by the node itself, each instance through the same store function as a C-STORE
(:meth:`~dicom_node.ingest.store_handler.StoreHandler.store_file`), and the study is complete (its timer due at once)
when its retrieve ends. Bounds, retries and resume are the same ("move" below means either).

A search or a move that fails is retried with exponential backoff (with jitter), up to ``max_attempts``; a
permanent failure (the PACS does not know the node, ...) is not retried. Each failure is visible: ``last_error``
of the run or study (``backfill --status``, the console), a log line, and ``/metrics``. Everything is in the
database, so a node killed at any moment resumes: moves found under way at start-up are due again at once.
Logs name run ids and counts, never a study's or a patient's identifiers.
"""

from __future__ import annotations

import logging
import random
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit

from dicom_node import audit
from dicom_node.config import BackfillSourceConfig, Config, parse_window
from dicom_node.ingest.store_handler import StoreHandler
from dicom_node.logs import safe_traceback
from dicom_node.net.dicomweb import DicomWebQueryClient
from dicom_node.net.query import (
    MoveError,
    MoveResult,
    PermanentQueryError,
    QueryClient,
    QueryError,
    Timeouts,
    TransientQueryError,
)
from storage import Store
from storage.backfill import DueMove, FoundStudy, RunToSearch
from storage.base import utcnow
from storage.errors import StorageError

log = logging.getLogger(__name__)

MAX_MOVE_THREADS = 16  # the pool's size; a run's max_concurrent_moves bounds how many are used
STALE_MARGIN_S = 60.0  # a move still "moving" this long after move_timeout_s was lost: it is due again


@dataclass(frozen=True)
class Bounds:
    concurrency: int
    per_hour: int  # 0 = unbounded
    window: str | None

    def open_at(self, local: datetime) -> bool:
        return in_window(self.window, local)


def in_window(window: str | None, local: datetime) -> bool:
    """Whether the local time ``local`` lies in ``window`` ("HH:MM-HH:MM", may wrap midnight; None = always)."""
    if window is None:
        return True
    start, end = parse_window(window)
    minute = local.hour * 60 + local.minute
    return start <= minute < end if start < end else minute >= start or minute < end


def backoff_s(attempts: int, initial_s: float, max_s: float) -> float:
    """The delay before attempt ``attempts + 1``: doubling from ``initial_s``, at most ``max_s``, with jitter."""
    return min(max_s, initial_s * 2 ** max(0, attempts - 1)) * random.uniform(0.5, 1.0)


class Backfiller:
    """The backfill side of ``serve``: :meth:`tick` runs every ``backfill.check_interval_s``."""

    def __init__(self, config: Config, store: Store, ingest: StoreHandler | None = None):
        self.config = config
        self.cfg = config.backfill
        self.store = store
        self.ingest = ingest  # stores what a DICOMweb source's retrieves bring (the C-STORE handler's function)
        self.destination = self.cfg.move_destination or config.node.ae_title
        timeouts = Timeouts(config.delivery.connect_timeout_s, config.delivery.dimse_timeout_s, self.cfg.move_timeout_s)
        source = self.cfg.source
        self.client: QueryClient | DicomWebQueryClient | None = None
        if isinstance(source, BackfillSourceConfig):
            self.client = QueryClient(source, config.node.ae_title, timeouts)
        elif source is not None:
            self.client = DicomWebQueryClient(source)
        self._pool = ThreadPoolExecutor(max_workers=MAX_MOVE_THREADS, thread_name_prefix="backfill-move")
        self._lock = threading.Lock()
        self._in_flight = 0
        self._held_back = ""  # why no move starts now (logged once each time it changes)
        self.stopping = threading.Event()

    def start(self) -> None:
        """At start-up: moves that were under way when the node stopped are due again now."""
        n = self.store.requeue_interrupted_moves()
        if n:
            log.info("backfill: %d interrupted move(s) are due again", n)

    def stop(self) -> None:
        """Start nothing more; abort the moves under way (they are moved again at the next start)."""
        self.stopping.set()
        if self.client is not None:
            self.client.abort_all()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def in_flight(self) -> int:
        with self._lock:
            return self._in_flight

    def bounds(self, settings: dict) -> Bounds:
        """A run's bounds: its own where it set them, else the configuration's."""

        def pick(key: str, default):
            value = settings.get(key)
            return default if value is None else value

        if settings.get("deliver"):  # an operator's re-analysis of one study: now, not in the night's window
            return Bounds(int(pick("max_concurrent_moves", self.cfg.max_concurrent_moves)), 0, None)
        return Bounds(
            int(pick("max_concurrent_moves", self.cfg.max_concurrent_moves)),
            int(pick("studies_per_hour", self.cfg.studies_per_hour)),
            pick("window", self.cfg.window),
        )

    # ---- the scheduled check --------------------------------------------------------------------------------
    def tick(self) -> None:
        if self.stopping.is_set() or self.client is None:
            return
        try:
            for run in self.store.backfill_runs_to_search():
                if self.stopping.is_set():
                    return
                self._search(run)
            self._start_moves()
            for run_id in self.store.finish_backfill_runs():
                log.info("backfill run %d done", run_id)
                audit.event("backfill_done", run=run_id)
        except StorageError as exc:  # nothing is lost: the rows stay as they are and are looked at next check
            log.error("backfill: storage failure, retrying: %s", exc)
        except Exception as exc:  # noqa: BLE001 - a bug must not stop the schedule; say where it is
            log.error("backfill: unexpected error, retrying:\n%s", safe_traceback(exc))

    # ---- search -----------------------------------------------------------------------------------------------
    def _search(self, run: RunToSearch) -> None:
        assert self.client is not None
        q = run.query
        date_from, date_to = (q.get("from") or "").replace("-", ""), (q.get("to") or "").replace("-", "")
        date_range = f"{date_from}-{date_to}" if date_from or date_to else ""
        try:
            matches = self.client.find_studies(
                date_range=date_range,
                modalities=q.get("modalities") or ["CR", "DX"],
                accession_numbers=q.get("accession_numbers") or [],
                study_uids=q.get("study_uids") or [],
            )
        except QueryError as exc:
            self._search_failed(run, exc)
            return
        except Exception as exc:  # noqa: BLE001 - pynetdicom or the socket: worth retrying; keep the trace
            log.error("backfill run %d: unexpected error while searching:\n%s", run.id, safe_traceback(exc))
            self._search_failed(run, TransientQueryError(f"search failed ({type(exc).__name__})"))
            return
        outcome = self.store.backfill_search_done(
            run.id,
            [FoundStudy(m.study_uid, m.accession_number, m.study_date, m.instances) for m in matches],
        )
        log.info(
            "backfill run %d: the PACS found %d studies: %d to pull, %d already held",
            run.id,
            outcome.found,
            outcome.new,
            outcome.already_held,
        )
        audit.event("backfill_searched", run=run.id, found=outcome.found, new=outcome.new, held=outcome.already_held)

    def _search_failed(self, run: RunToSearch, exc: QueryError) -> None:
        attempts = run.attempts + 1
        if isinstance(exc, PermanentQueryError) or attempts >= self.cfg.max_attempts:
            why = "permanent" if isinstance(exc, PermanentQueryError) else f"gave up after {attempts} attempts"
            log.error("backfill run %d: search failed (%s): %s", run.id, why, exc)
            self.store.backfill_search_failed(run.id, f"{exc} ({why})", None)
            audit.event("backfill_failed", run=run.id, error=f"{exc} ({why})")
            return
        delay = backoff_s(attempts, self.cfg.retry_initial_s, self.cfg.retry_max_s)
        log.warning("backfill run %d: search failed: %s; retry %d in %.0f s", run.id, exc, attempts, delay)
        self.store.backfill_search_failed(run.id, str(exc), utcnow() + timedelta(seconds=delay))

    # ---- moves --------------------------------------------------------------------------------------------------
    def _start_moves(self) -> None:
        stale_before = utcnow() - timedelta(seconds=self.cfg.move_timeout_s + STALE_MARGIN_S)
        while not self.stopping.is_set():
            due = self.store.next_due_move(stale_before)
            if due is None:
                self._hold("")
                return
            bounds = self.bounds(due.settings)
            if self.in_flight() >= bounds.concurrency:
                return
            if not bounds.open_at(datetime.now()):
                self._hold(f"outside the time window {bounds.window}")
                return
            if bounds.per_hour and self.store.moves_started_since(utcnow() - timedelta(hours=1)) >= bounds.per_hour:
                self._hold(f"{bounds.per_hour} moves started in the last hour (studies_per_hour)")
                return
            if not self.store.claim_move(due):
                continue  # taken by another thread or process: look again
            self._hold("")
            with self._lock:
                self._in_flight += 1
            try:
                self._pool.submit(self._move, due)
            except RuntimeError:  # the pool is shut down: stopping
                with self._lock:
                    self._in_flight -= 1
                return

    def _hold(self, why: str) -> None:
        if why != self._held_back:
            if why:
                log.info("backfill: waiting to start moves: %s", why)
            self._held_back = why

    def _move(self, due: DueMove) -> None:
        assert self.client is not None
        try:
            if isinstance(self.client, DicomWebQueryClient):
                result = self._retrieve(due.study_uid)
            else:
                result = self.client.move_study(due.study_uid, self.destination)
        except MoveError as exc:
            self._move_failed(due, exc.kind(str(exc)), exc.counts.completed)
        except QueryError as exc:
            self._move_failed(due, exc, 0)
        except Exception as exc:  # noqa: BLE001 - pynetdicom or the socket: worth retrying; keep the trace
            if not self.stopping.is_set():
                log.error("backfill run %d: unexpected error while moving:\n%s", due.run_id, safe_traceback(exc))
            self._move_failed(due, TransientQueryError(f"move failed ({type(exc).__name__})"), 0)
        else:
            if result.completed == 0 and result.warning == 0:
                self._move_failed(due, PermanentQueryError("the PACS sent no images for this study"), 0)
            else:
                self.store.mark_moved(due.study_uid, result.completed + result.warning)
                log.info("backfill run %d: study moved (%d images)", due.run_id, result.completed + result.warning)
                if due.deliver:
                    self._analyse_fetched(due)
        finally:
            with self._lock:
                self._in_flight -= 1

    def _analyse_fetched(self, due: DueMove) -> None:
        """A re-analysis fetch is done: queue the re-analysis unless the study's timer (or a job made since the move
        started) already sees to it: when the node had a row for every instance, only their files were back."""
        try:
            if self.store.fetched_study_needs_job(due.study_uid):
                job_id = self.store.reanalyze(due.study_uid)
                log.info("backfill run %d: re-analysis of the fetched study queued (job %d)", due.run_id, job_id)
        except StorageError as exc:  # UnknownStudyError: purged meanwhile; nothing to analyse
            log.error("backfill run %d: could not queue the re-analysis of the fetched study: %s", due.run_id, exc)

    def _retrieve(self, study_uid: str) -> MoveResult:
        """WADO-RS: the study's instances through the store function, then the study is complete (due now)."""
        assert isinstance(self.client, DicomWebQueryClient) and self.ingest is not None
        ingest = self.ingest
        calling = "WADO:backfill"
        peer = urlsplit(self.client.source.dicomweb).hostname or "?"

        def store(path: Path) -> bool:
            return ingest.store_file(path, calling=calling, peer=peer, transport="WADO-RS").stored

        result = self.client.retrieve_study(study_uid, self.store.spool.tmp, store)
        ingest.study_complete(study_uid)
        return result

    def _move_failed(self, due: DueMove, exc: QueryError, moved: int) -> None:
        if self.stopping.is_set():
            return  # aborted by the shutdown: still "moving", moved again at the next start
        attempts = due.attempts + 1
        if isinstance(exc, PermanentQueryError) or attempts >= self.cfg.max_attempts:
            why = "permanent" if isinstance(exc, PermanentQueryError) else f"gave up after {attempts} attempts"
            log.error("backfill run %d: a study's move failed (%s): %s", due.run_id, why, exc)
            self.store.mark_move_failed(due.study_uid, f"{exc} ({why})", moved)
            return
        delay = backoff_s(attempts, self.cfg.retry_initial_s, self.cfg.retry_max_s)
        log.warning("backfill run %d: a study's move failed: %s; retry %d in %.0f s", due.run_id, exc, attempts, delay)
        self.store.mark_move_retry(due.study_uid, utcnow() + timedelta(seconds=delay), str(exc), moved)
