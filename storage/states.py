"""States of queued work, as stored in the database (plain strings, stable for the status JSON)."""

from __future__ import annotations

from enum import IntEnum, StrEnum


class JobState(StrEnum):
    QUEUED = "queued"  # waiting for a worker
    RUNNING = "running"  # claimed by a worker holding a lease
    DONE = "done"  # results written and deliveries queued
    FAILED = "failed"  # the reason says why; `dicom-node reanalyze` re-runs the study


class DeliveryState(StrEnum):
    PENDING = "pending"  # due at next_attempt_at
    DELIVERED = "delivered"
    FAILED = "failed"  # permanent failure or attempts exhausted; `dicom-node retry` re-queues
    HELD = "held"  # made for a silent destination: kept, never sent unless an operator releases it


class QueuePriority(IntEnum):
    """A job's and a delivery's place in their queues, stored as the number: the lower is taken first."""

    URGENT = 0  # the sender asked for it, or (once analysed) the priority rules found it urgent
    ROUTINE = 1
