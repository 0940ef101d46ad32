"""The delivery outbox: :class:`OutboxStore` hands due deliveries of result objects to the sender, records each
attempt's outcome and re-queues failed ones (operator actions); it also answers which objects are the node's own
results. :class:`DueDelivery` is one delivery to attempt.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import cast

from sqlalchemy import and_, func, select, update

from storage.base import StoreBase, database_errors, rowcount, utcnow
from storage.db import Delivery, Result
from storage.states import DeliveryState, QueuePriority


@dataclass(frozen=True)
class DueDelivery:
    id: int
    destination: str
    attempts: int
    kind: str
    sop_instance_uid: str
    path: Path
    priority: int = QueuePriority.ROUTINE  # urgent ones come first


class OutboxStore(StoreBase):
    """The results-and-deliveries part of the Store."""

    @database_errors
    def results_of_study(self, study_uid: str) -> list[Result]:
        with self._session() as s:
            return list(s.scalars(select(Result).where(Result.study_uid == study_uid).order_by(Result.id)))

    @database_errors
    def is_own_output(self, sop_uid: str) -> bool:
        with self._session() as s:
            # COUNT(*) always yields one row, so the scalar is never None (likewise in status())
            n = cast(int, s.scalar(select(func.count()).select_from(Result).where(Result.sop_instance_uid == sop_uid)))
            return n > 0

    # ---- deliveries --------------------------------------------------------------------------------
    @database_errors
    def due_deliveries(self, limit: int = 50, now: datetime | None = None) -> list[DueDelivery]:
        """The deliveries due now: those of urgent studies first, then the longest waiting."""
        now = now or utcnow()
        with self._session() as s:
            rows = s.execute(
                select(
                    Delivery.id,
                    Delivery.destination,
                    Delivery.attempts,
                    Result.kind,
                    Result.sop_instance_uid,
                    Result.path,
                    Delivery.priority,
                )
                .join(Result, Result.id == Delivery.result_id)
                .where(Delivery.state == DeliveryState.PENDING, Delivery.next_attempt_at <= now)
                .order_by(Delivery.priority, Delivery.next_attempt_at, Delivery.id)
                .limit(limit)
            )
            return [DueDelivery(r[0], r[1], r[2], r[3], r[4], self.spool.resolve(r[5]), r[6]) for r in rows]

    @database_errors
    def _set_delivery(self, delivery_id: int, **values) -> None:
        with self._session.begin() as s:
            s.execute(update(Delivery).where(Delivery.id == delivery_id).values(**values))

    def mark_delivered(self, delivery_id: int) -> None:
        now = utcnow()
        self._set_delivery(
            delivery_id,
            state=DeliveryState.DELIVERED,
            delivered_at=now,
            last_attempt_at=now,
            last_error=None,
            attempts=Delivery.attempts + 1,
        )

    def mark_retry(self, delivery_id: int, next_attempt_at: datetime, error: str) -> None:
        self._set_delivery(
            delivery_id,
            next_attempt_at=next_attempt_at,
            last_error=error[:2000],
            last_attempt_at=utcnow(),
            attempts=Delivery.attempts + 1,
        )

    def mark_failed(self, delivery_id: int, error: str) -> None:
        self._set_delivery(
            delivery_id,
            state=DeliveryState.FAILED,
            last_error=error[:2000],
            last_attempt_at=utcnow(),
            attempts=Delivery.attempts + 1,
        )

    @database_errors
    def hold(self, delivery_ids: list[int]) -> int:
        """Pending deliveries to a destination that is now silent: held, not sent (a destination switched from
        live to silent sends nothing more)."""
        with self._session.begin() as s:
            return rowcount(
                s.execute(
                    update(Delivery)
                    .where(Delivery.id.in_(delivery_ids), Delivery.state == DeliveryState.PENDING)
                    .values(state=DeliveryState.HELD)
                )
            )

    @database_errors
    def release_held(self, destination: str, since: datetime | None = None, study_uid: str | None = None) -> int:
        """An operator sends results held while ``destination`` was silent (``dicom-node release``): all of them,
        those made since ``since``, or one study's. Returns how many deliveries were queued."""
        which = and_(Delivery.destination == destination, Delivery.state == DeliveryState.HELD)
        if since is not None:
            which = and_(which, Delivery.created_at >= since)
        if study_uid is not None:
            which = and_(which, Delivery.result_id.in_(select(Result.id).where(Result.study_uid == study_uid)))
        with self._session.begin() as s:
            return rowcount(
                s.execute(update(Delivery).where(which).values(state=DeliveryState.PENDING, next_attempt_at=utcnow()))
            )

    @database_errors
    def held_counts(self) -> dict[str, int]:
        """Held deliveries per destination."""
        with self._session() as s:
            rows = s.execute(
                select(Delivery.destination, func.count())
                .where(Delivery.state == DeliveryState.HELD)
                .group_by(Delivery.destination)
            )
            return {r[0]: int(r[1]) for r in rows}

    @database_errors
    def retry_failed(self, delivery_id: int | None = None) -> int:
        """Re-queue every failed delivery, or only ``delivery_id`` (operator actions: ``dicom-node retry``, the
        console's button); returns how many (0: that delivery is not failed)."""
        failed = Delivery.state == DeliveryState.FAILED
        which = failed if delivery_id is None else and_(failed, Delivery.id == delivery_id)
        with self._session.begin() as s:
            return rowcount(
                s.execute(
                    update(Delivery)
                    .where(which)
                    .values(state=DeliveryState.PENDING, next_attempt_at=utcnow(), attempts=0)
                )
            )
