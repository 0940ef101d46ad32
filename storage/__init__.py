"""Durable storage: spool files, the database, and the states of instances, jobs and deliveries.

No DICOM parsing and no model code lives here: callers hand in bytes and already-extracted fields.
"""

from storage.repository import Store
from storage.spool import Spool
from storage.states import DeliveryState, JobState

__all__ = ["Store", "Spool", "JobState", "DeliveryState"]
