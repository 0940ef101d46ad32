"""The objects every entry point builds from one validated :class:`Config`: the store and the pipeline.

    open_store        ``serve``, ``worker``, ``status``/``retry``/``purge``/... and the console
    build_pipeline    ``worker``, ``analyze``, ``check-config --models`` and the console's analyse page

A leaf of the node: it imports only the configuration and the two packages it builds from, so that ``status``
opens the store without importing pynetdicom, apscheduler or the web server, and nothing that builds an object
has to reach up into the composition root (:mod:`dicom_node.app`). Importing it does not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dicom_node.config import Config
from storage import Store

if TYPE_CHECKING:
    from inference.pipeline import Pipeline

__all__ = ["open_store", "build_pipeline", "describe_pipeline"]


def open_store(config: Config, owner: str = "") -> Store:
    """The Store of ``config``; ``owner`` names this process's own folder in the spool's ``tmp/`` (a ``serve``
    instance's or a worker's name; a short command writes into ``tmp/`` itself)."""
    config.storage.root.mkdir(parents=True, exist_ok=True)
    return Store(
        config.storage.resolved_database_url, config.storage.root, config.storage.min_free_disk_mb, owner=owner
    )


def build_pipeline(config: Config) -> Pipeline:
    """Load both models (torch is imported here, in the calling process)."""
    from inference.pipeline import Pipeline

    m = config.inference.models
    if m.threads:
        Pipeline.limit_threads(m.threads)
    return Pipeline.from_files(
        m.classifier,
        m.detector,
        fusion=config.inference.fusion,
        device=m.device,
        calibration=m.calibration,
        backend=m.backend,
    )


def describe_pipeline(pipeline: Pipeline) -> str:
    """What a worker reports it runs: ``classifier resnet18 0.2.0 (4f2a9c1b); detector yolov8s 0.3.0 (...)``."""
    from inference.types import models_summary

    return models_summary((pipeline.classifier.info, pipeline.detector.info), digests=True)
