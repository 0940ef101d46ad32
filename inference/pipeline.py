"""CLAHE -> classifier -> detector -> fusion on one greyscale image.

``Pipeline.from_files(classifier_path, detector_path, fusion, device)`` loads both model files;
``Pipeline.run(img01)`` takes a 2-D float32 image in [0, 1] (0 = black; the DICOM side has
applied the LUTs and MONOCHROME1 inversion) and returns an :class:`inference.types.Prediction`
(a "not analysable" one, with the reason, when :func:`inference.quality.input_problem` refuses the image)
with findings in source-pixel coordinates and per-stage timings (seconds)::

    resize           shrinking to the working size (the larger model input size), aspect kept
    clahe            CLAHE at the working size, once, shared by both models (twice only if their settings differ)
    classifier_input letterbox + normalise for the classifier
    classifier       classifier forward
    detector_input   letterbox for the detector
    detector         detector forward + NMS + mapping boxes to source pixels (0.0 when gated off)
    fusion           fusing scores into findings
    total            the whole run
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import replace
from typing import NamedTuple

import numpy as np
import torch

from inference.calibration import Calibration
from inference.classifier import Classifier
from inference.detector import Detections, Detector
from inference.fusion import FusionParams, detector_needed, fuse
from inference.preprocess import Letterbox, apply_clahe, check_image, prepare, to_model_input, working_image
from inference.quality import input_problem
from inference.types import ModelInfo, Prediction

__all__ = ["Pipeline"]


log = logging.getLogger(__name__)


class _Prepared(NamedTuple):
    """An image ready for the networks."""

    image: np.ndarray  # the checked source image
    classifier_input: np.ndarray  # C x S x S, letterboxed and normalised
    detector_clahe: np.ndarray  # the working image with the detector's CLAHE
    scale: tuple[float, float]  # (x, y) working-image pixels -> source pixels


def _chunks(items: list[int], size: int) -> list[list[int]]:
    size = max(1, int(size))
    return [items[i : i + size] for i in range(0, len(items), size)]


def _greyscale(img01: np.ndarray) -> np.ndarray:
    """``img01`` as an array, refused unless it is one 2-D greyscale image."""
    arr = np.asarray(img01)
    if arr.ndim != 2:
        raise ValueError(
            f"the pipeline takes one 2-D greyscale image (rows, columns); got an array "
            f"of shape {arr.shape} (colour or multi-frame images are not analysed)"
        )
    return arr


def _image_size(img: np.ndarray) -> tuple[int, int]:
    return (int(img.shape[0]), int(img.shape[1]))


def _to_source_pixels(dets: Detections, item: _Prepared) -> Detections:
    """``dets`` with its boxes mapped from working-image pixels to the source image's pixels."""
    fx, fy = item.scale
    if (fx, fy) == (1.0, 1.0):
        return dets
    rows, cols = item.image.shape[0], item.image.shape[1]
    boxes = np.minimum(dets.boxes * np.array([fx, fy, fx, fy]), np.array([cols, rows, cols, rows], float))
    return replace(dets, boxes=boxes)


class Pipeline:
    def __init__(self, classifier: Classifier, detector: Detector, fusion: FusionParams | None = None):
        self.classifier = classifier
        self.detector = detector
        self.fusion = FusionParams.from_obj(fusion)
        self._shared_clahe = classifier.preprocess.same_clahe(detector.preprocess)
        if not self._shared_clahe:
            log.info("classifier and detector preprocess differently (intensity or CLAHE); CLAHE runs twice")

    @classmethod
    def from_files(
        cls,
        classifier_path: str | os.PathLike,
        detector_path: str | os.PathLike,
        fusion: FusionParams | dict | object | None = None,
        device: str = "cpu",
        iou: float = 0.7,
        calibration: str | os.PathLike | None = None,
        backend: str = "torch",
    ) -> "Pipeline":
        """``fusion``: FusionParams, a dict or any object with its attribute names (FusionConfig);
        ``calibration``: a site calibration file (:mod:`inference.calibration`) for the classifier;
        ``backend``: ``torch`` or ``onnxruntime`` (:mod:`inference.onnx_backend`)."""
        classifier = Classifier.load(classifier_path, device, backend)
        if calibration is not None:
            classifier.use_calibration(Calibration.load(calibration), calibration)
        detector = Detector.load(detector_path, device, iou=iou, backend=backend)
        return cls(classifier, detector, FusionParams.from_obj(fusion))

    @property
    def working_size(self) -> int:
        """The longer side the image is shrunk to before CLAHE and the models: more pixels are not used."""
        return max(self.classifier.preprocess.input_size, self.detector.preprocess.input_size)

    @property
    def models(self) -> tuple[ModelInfo, ...]:
        return (self.classifier.info, self.detector.info)

    def classifier_input(self, img01: np.ndarray) -> np.ndarray:
        """The classifier's prepared input (1 x S x S) for an image, exactly as :meth:`run` makes it."""
        img = check_image(img01, "pipeline input")
        return prepare(img, self.classifier.preprocess, self.working_size)[0]

    def run(self, img01: np.ndarray, view: str | None = None) -> Prediction:
        """``view``: the image's ViewPosition (PA, AP, ...) when known; it selects a site calibration's
        operating point (:mod:`inference.calibration`)."""
        return self.run_batch([img01], [view])[0]

    def run_batch(
        self, images: list[np.ndarray], views: list[str | None] | None = None, batch_size: int = 8
    ) -> list[Prediction]:
        """:meth:`run` for several images (e.g. the images of a study): each network sees up to ``batch_size``
        of them in one forward pass, which is what makes a GPU worth having. The results are those of
        :meth:`run` image by image; a network's time is shared out equally among the images of its batch."""
        views = list(views) if views is not None else [None] * len(images)
        if len(views) != len(images):
            raise ValueError(f"{len(images)} images but {len(views)} views")
        preds: list[Prediction | None] = [None] * len(images)
        timings: list[dict[str, float]] = [{} for _ in images]
        prepared: dict[int, _Prepared] = {}
        for k, img01 in enumerate(images):
            ready = self._prepare(img01, timings[k])
            if isinstance(ready, Prediction):
                preds[k] = ready
            else:
                prepared[k] = ready
        p_abnormal = self._classify(prepared, views, timings, batch_size)
        detections = self._detect(prepared, p_abnormal, timings, batch_size)
        for k, item in prepared.items():
            preds[k] = self._assemble(item, p_abnormal[k], detections.get(k), timings[k])
        return [p for p in preds if p is not None]

    def _prepare(self, img01: np.ndarray, t: dict[str, float]) -> _Prepared | Prediction:
        """Check, shrink and CLAHE one image and make its classifier input; an unanalysable image's
        :class:`Prediction` when the quality check refuses it. Records resize, clahe, classifier_input and
        (so far) total in ``t``."""
        arr = _greyscale(img01)
        t0 = time.perf_counter()
        img = check_image(arr, "pipeline input")
        refused = self._quality_check(img)
        if refused is not None:
            return refused
        s = time.perf_counter()
        work, scale = working_image(img, self.working_size)
        t["resize"] = time.perf_counter() - s
        s = time.perf_counter()
        clahe_c = apply_clahe(work, self.classifier.preprocess)
        clahe_d = clahe_c if self._shared_clahe else apply_clahe(work, self.detector.preprocess)
        t["clahe"] = time.perf_counter() - s
        s = time.perf_counter()
        xc, _ = to_model_input(clahe_c, self.classifier.preprocess)
        t["classifier_input"] = time.perf_counter() - s
        t["total"] = time.perf_counter() - t0
        return _Prepared(image=img, classifier_input=xc, detector_clahe=clahe_d, scale=scale)

    def _quality_check(self, img: np.ndarray) -> Prediction | None:
        """The "not analysable" prediction for an image :func:`inference.quality.input_problem` refuses, else None."""
        problem = input_problem(img)
        if not problem:
            return None
        return Prediction.unanalysable(problem, self.fusion.mode, self.models, _image_size(img))

    def _classify(
        self,
        prepared: dict[int, _Prepared],
        views: list[str | None],
        timings: list[dict[str, float]],
        batch_size: int,
    ) -> dict[int, float]:
        """p(abnormal) of each prepared image, ``batch_size`` images per classifier pass."""
        p_abnormal: dict[int, float] = {}
        for chunk in _chunks(list(prepared), batch_size):
            s = time.perf_counter()
            xs = np.stack([prepared[k].classifier_input for k in chunk])
            probs = self.classifier.predict(xs, [views[k] for k in chunk])
            share = (time.perf_counter() - s) / len(chunk)
            for k, p in zip(chunk, probs):
                p_abnormal[k] = float(p)
                timings[k]["classifier"] = share
        return p_abnormal

    def _detect(
        self,
        prepared: dict[int, _Prepared],
        p_abnormal: dict[int, float],
        timings: list[dict[str, float]],
        batch_size: int,
    ) -> dict[int, Detections]:
        """Detections (in source pixels) of the prepared images the fusion gate lets through, ``batch_size``
        images per detector pass; detector_input and detector stay 0.0 for the others."""
        for k in prepared:
            timings[k]["detector_input"] = timings[k]["detector"] = 0.0
        wanted = [k for k in prepared if detector_needed(p_abnormal[k], self.fusion)]
        detections: dict[int, Detections] = {}
        for chunk in _chunks(wanted, batch_size):
            xs, geoms = self._detector_inputs([prepared[k] for k in chunk], [timings[k] for k in chunk])
            s = time.perf_counter()
            found = self.detector.detect_batch(
                xs, geoms, conf=self.fusion.detector_conf, max_det=max(300, self.fusion.max_findings)
            )
            share = (time.perf_counter() - s) / len(chunk)
            for k, dets in zip(chunk, found):
                detections[k] = _to_source_pixels(dets, prepared[k])
                timings[k]["detector"] = share
        return detections

    def _detector_inputs(
        self, items: list[_Prepared], timings: list[dict[str, float]]
    ) -> tuple[list[np.ndarray], list[Letterbox]]:
        """The detector's letterboxed inputs and their geometries; records detector_input in each timing."""
        xs, geoms = [], []
        for item, t in zip(items, timings):
            s = time.perf_counter()
            xd, geom = to_model_input(item.detector_clahe, self.detector.preprocess)
            t["detector_input"] = time.perf_counter() - s
            xs.append(xd)
            geoms.append(geom)
        return xs, geoms

    def _assemble(self, item: _Prepared, p_abnormal: float, dets: Detections | None, t: dict[str, float]) -> Prediction:
        """Fuse the scores into findings and make the image's :class:`Prediction` (``dets`` None = detector
        not run); records fusion and completes total in ``t``."""
        s = time.perf_counter()
        if dets is not None:
            findings, p_no_finding = fuse(p_abnormal, dets.boxes, dets.scores, dets.class_ids, self.fusion)
        else:
            findings, p_no_finding = fuse(p_abnormal, None, None, None, self.fusion)
        t["fusion"] = time.perf_counter() - s
        t["total"] += sum(t[key] for key in ("classifier", "detector_input", "detector", "fusion"))
        return Prediction(
            p_abnormal=p_abnormal,
            p_no_finding=float(p_no_finding),
            findings=findings,
            fusion_mode=self.fusion.mode,
            models=self.models,
            image_size=_image_size(item.image),
            timings_s=t,
        )

    @staticmethod
    def limit_threads(n: int) -> None:
        """Convenience for small machines: cap torch's intra-op threads."""
        torch.set_num_threads(max(1, int(n)))
