"""The analyser: one claimed job in, its result objects out (SR for the study, SC and GSPS per image, and one
message per notification destination whose ``when`` the study's priority meets: HL7, FHIR, webhook or email).

Pure: it reads the job's spool files and writes nothing; the worker hands its results to storage in one commit.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from io import BytesIO

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from dicom_node import __version__
from dicom_node.config import Config
from dicom_node.errors import PixelDataError
from dicom_node.imaging.pixels import decode_image, read_dataset
from dicom_node.ingest.selection import header_fields
from dicom_node.outputs.equipment import NodeIdentity
from dicom_node.outputs.gsps import build_gsps
from dicom_node.outputs.messages import PAYLOAD_SUFFIX, payload_for, summarise
from dicom_node.outputs.sc import build_sc
from dicom_node.outputs.sr import build_sr
from dicom_node.outputs.uids import derived_uid
from dicom_node.work.priority import Priority, study_priority
from inference.pipeline import Pipeline
from inference.types import Prediction
from storage.jobs import FindingSpec, ImageVerdict, JobInfo, ResultSpec


def node_identity(config: Config, pipeline: Pipeline) -> NodeIdentity:
    return NodeIdentity(
        device_observer_uid=derived_uid("dicom-node device observer", config.node.ae_title),
        software_version=__version__,
        institution=config.outputs.institution_name,
        station_name=config.node.ae_title,
        models=pipeline.models,
    )


@dataclass
class _Analysed:
    sop_uid: str
    header: Dataset
    image01: np.ndarray | None  # as decoded: Rows x Columns, or smaller (JPEG 2000); None: pixels undecodable
    window: tuple[float, float] | None
    prediction: Prediction  # boxes in source pixels (SR, GSPS)
    shown: Prediction  # the same on image01's pixels (the Secondary Capture is drawn on image01)


Wanted = tuple[tuple[str, ...], tuple[str, ...]]  # destinations taking an output: (live, silent)
# result objects, pipeline seconds, verdicts, the study's priority
Analysis = tuple[list[ResultSpec], float, list[ImageVerdict], Priority]


class Analyzer:
    """Turns one claimed job into result objects (pure: no database writes)."""

    def __init__(self, config: Config, pipeline: Pipeline):
        self.config = config
        self.pipeline = pipeline
        self.identity = node_identity(config, pipeline)

    def _raw(self, a: _Analysed) -> float | None:
        """The classifier's raw probability of the image (before its view's operating point was mapped to 0.5)."""
        p = a.prediction.p_abnormal
        if a.prediction.not_analysable or not 0.0 < p < 1.0:
            return None if a.prediction.not_analysable else float(p)
        shift = self.pipeline.classifier.logit_shift(header_fields(a.header)["view_position"] or None)
        return float(1.0 / (1.0 + math.exp(-(math.log(p / (1.0 - p)) + shift))))

    def wanted(self, kind: str) -> Wanted:
        """The destinations that take ``kind``: (live ones, silent ones)."""
        takes = [d for d in self.config.result_destinations if kind in d.outputs]
        return tuple(d.name for d in takes if d.mode == "live"), tuple(d.name for d in takes if d.mode == "silent")

    def analyse_many(self, jobs: list[JobInfo]) -> list[Analysis | Exception]:
        """Jobs (one, or several claimed together: ``workers.jobs_per_batch``) -> per job its analysis, or the
        exception that failed it. Their images go through each network together (at most
        ``inference.models.batch_images`` per forward pass); a job's bad image never fails another job.

        Every image whose pixels decode is analysed; one whose pixels do not is "not analysable" in the SR (no SC
        or GSPS for it), so its study still gets the result of its good images. When no image of a job decodes,
        the job fails with the first image's reason. An analysis is the result objects, the pipeline time and
        the verdict per image (what the SR says, for the console)."""
        prepared: list[list[_Analysed] | Exception] = []
        todo: list[tuple[int, int, np.ndarray, str | None]] = []  # (job, image in job, image, view)
        for j, job in enumerate(jobs):
            try:
                analysed, decoded = self._decode(job)
            except Exception as exc:  # noqa: BLE001 - handed back as this job's outcome
                prepared.append(exc)
                continue
            prepared.append(analysed)
            todo.extend((j, k, img, view) for k, img, view in decoded)
        t0 = time.perf_counter()
        try:
            shown_all = self.pipeline.run_batch(
                [img for _, _, img, _ in todo],
                [view for _, _, _, view in todo],
                batch_size=self.config.inference.models.batch_images,
            )
        except Exception as exc:  # noqa: BLE001 - a model failure fails every job of the batch
            return [exc for _ in jobs]
        per_image_s = (time.perf_counter() - t0) / max(1, len(todo))
        for (j, k, _, _), shown in zip(todo, shown_all):
            a = prepared[j][k]  # type: ignore[index]
            a.shown, a.prediction = shown, shown.rescaled((a.header.Rows, a.header.Columns))
        out: list[Analysis | Exception] = []
        for j, got in enumerate(prepared):
            if isinstance(got, Exception):
                out.append(got)
                continue
            try:
                n = sum(1 for t in todo if t[0] == j)
                verdicts = [verdict(a.sop_uid, a.prediction, self._raw(a)) for a in got]
                priority = study_priority(self.config.priority, [a.prediction for a in got], jobs[j].requested)
                out.append((self._encode(got, priority), per_image_s * n, verdicts, priority))
            except Exception as exc:  # noqa: BLE001 - an encoding failure fails this job only
                out.append(exc)
        return out

    def _decode(self, job: JobInfo) -> tuple[list[_Analysed], list[tuple[int, np.ndarray, str | None]]]:
        """The job's images read and decoded: every image (undecodable ones already "not analysable"), and
        (index, image, view) of those to run through the models."""
        analysed: list[_Analysed] = []
        undecodable: list[PixelDataError] = []
        decoded: list[tuple[int, np.ndarray, str | None]] = []
        for n, (sop_uid, path) in enumerate(job.instances, 1):
            try:
                ds = read_dataset(path)
            except PixelDataError as exc:  # not even the header: nothing to reference in the SR
                raise PixelDataError(f"image {n} of {len(job.instances)}: {exc}") from exc
            try:
                image01, window = decode_image(ds, at_least=self.pipeline.working_size)
            except PixelDataError as exc:
                if "Rows" not in ds or "Columns" not in ds:
                    raise PixelDataError(f"image {n} of {len(job.instances)}: {exc}") from exc
                undecodable.append(PixelDataError(f"image {n} of {len(job.instances)}: {exc}"))
                reason = "pixel data could not be decoded"  # the details (library text) go to the job log only
                models = self.pipeline.models
                refused = Prediction.unanalysable(reason, self.pipeline.fusion.mode, models, (ds.Rows, ds.Columns))
                if "PixelData" in ds:
                    del ds.PixelData
                analysed.append(_Analysed(sop_uid, ds, None, None, refused, refused))
                continue
            decoded.append((len(analysed), image01, header_fields(ds)["view_position"] or None))
            del ds.PixelData  # the encoders need the header only
            pending = Prediction.unanalysable("not run yet", self.pipeline.fusion.mode, (), (ds.Rows, ds.Columns))
            analysed.append(_Analysed(sop_uid, ds, image01, window, pending, pending))
        if undecodable and len(undecodable) == len(analysed):
            raise undecodable[0]
        return analysed, decoded

    def _encode(self, analysed: list[_Analysed], priority: Priority) -> list[ResultSpec]:
        out = self.config.outputs
        ident = self.identity
        results: list[ResultSpec] = []
        sr_series, sc_series, pr_series = generate_uid(), generate_uid(), generate_uid()
        sr_uid = generate_uid()
        sr = build_sr(
            [(a.header, a.prediction) for a in analysed],
            series_uid=sr_series,
            sop_uid=sr_uid,
            series_number=out.series_number_sr,
            instance_number=1,
            identity=ident,
            priority=priority.level,
            priority_reasons=priority.reasons,
        )
        results.append(_spec("sr", sr, None, self.wanted("sr")))
        sc_dest, pr_dest = self.wanted("sc"), self.wanted("gsps")
        for n, a in enumerate(analysed, 1):
            if a.image01 is None:  # pixels undecodable: the SR says so; nothing to draw on
                continue
            if any(sc_dest):
                sc = build_sc(
                    a.header,
                    a.image01,
                    a.shown,
                    series_uid=sc_series,
                    sop_uid=generate_uid(),
                    series_number=out.series_number_sc,
                    instance_number=n,
                    identity=ident,
                    priority=priority.level,
                    priority_reasons=priority.reasons,
                )
                results.append(_spec("sc", sc, a.sop_uid, sc_dest))
            if any(pr_dest):
                pr = build_gsps(
                    a.header,
                    a.prediction,
                    series_uid=pr_series,
                    sop_uid=generate_uid(),
                    series_number=out.series_number_gsps,
                    instance_number=n,
                    identity=ident,
                    window=a.window,
                    priority=priority.level,
                    priority_reasons=priority.reasons,
                )
                results.append(_spec("gsps", pr, a.sop_uid, pr_dest))
        results.extend(self._messages(analysed, priority))
        return results

    def _messages(self, analysed: list[_Analysed], priority: Priority) -> list[ResultSpec]:
        """One message per notification destination that wants this study (``when: always``, or ``urgent`` and
        the study is urgent). A message is not a DICOM object: its result row's SOP Instance UID is a generated
        UID that names the message (unique, like an object's), its SOP Class and Series UIDs are empty."""
        wanted = [d for d in self.config.notification_destinations if d.when == "always" or priority.urgent]
        if not wanted:
            return []
        summary = summarise(
            [(a.header, a.prediction) for a in analysed], priority.level, priority.reasons, self.config.web.public_url
        )
        return [
            ResultSpec(
                kind=d.type,
                sop_instance_uid=generate_uid(),
                sop_class_uid="",
                series_uid="",
                source_sop_uid=None,
                data=payload_for(d, summary),
                destinations=(d.name,) if d.mode == "live" else (),
                held=(d.name,) if d.mode == "silent" else (),
                suffix=PAYLOAD_SUFFIX[d.type],
            )
            for d in wanted
        ]


def verdict(sop_uid: str, pred: Prediction, p_raw: float | None = None) -> ImageVerdict:
    """What is kept of one image's prediction. P(abnormal) is kept unrounded: site validation ranks by it."""
    if pred.not_analysable:
        return ImageVerdict(sop_uid, None, None, pred.not_analysable)
    findings = tuple(FindingSpec(f.label, round(f.score, 4), f.box) for f in pred.findings)
    return ImageVerdict(sop_uid, float(pred.p_abnormal), pred.abnormal, None, findings, p_raw)


def _spec(kind: str, ds: Dataset, source_sop_uid: str | None, wanted: Wanted) -> ResultSpec:
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return ResultSpec(
        kind=kind,
        sop_instance_uid=str(ds.SOPInstanceUID),
        sop_class_uid=str(ds.SOPClassUID),
        series_uid=str(ds.SeriesInstanceUID),
        source_sop_uid=source_sop_uid,
        data=buf.getvalue(),
        destinations=wanted[0],
        held=wanted[1],
    )
