"""Durable storage: spool files, the database, and the states of instances, jobs and deliveries.

No DICOM parsing and no model code lives here: callers hand in bytes and already-extracted fields.
"""
from .repository import Store
from .spool import Spool
from .states import DeliveryState, JobState

__all__ = ["Store", "Spool", "JobState", "DeliveryState"]
