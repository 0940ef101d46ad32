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

import numpy as np
import torch

from inference.calibration import Calibration
from inference.classifier import Classifier
from inference.detector import Detector
from inference.fusion import FusionParams, detector_needed, fuse
from inference.preprocess import apply_clahe, check_image, prepare, to_model_input, working_image
from inference.quality import input_problem
from inference.types import ModelInfo, Prediction

__all__ = ["Pipeline"]


def _chunks(items: list[int], size: int) -> list[list[int]]:
    size = max(1, int(size))
    return [items[i : i + size] for i in range(0, len(items), size)]


log = logging.getLogger(__name__)


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
        cp, dp = self.classifier.preprocess, self.detector.preprocess
        n = len(images)
        preds: list[Prediction | None] = [None] * n
        timings: list[dict[str, float]] = [{} for _ in range(n)]
        prepared: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray, tuple[float, float]]] = {}
        for k, img01 in enumerate(images):
            arr = np.asarray(img01)
            if arr.ndim != 2:
                raise ValueError(
                    f"the pipeline takes one 2-D greyscale image (rows, columns); got an array "
                    f"of shape {arr.shape} (colour or multi-frame images are not analysed)"
                )
            t = timings[k]
            t0 = time.perf_counter()
            img = check_image(arr, "pipeline input")
            problem = input_problem(img)
            if problem:
                preds[k] = Prediction.unanalysable(
                    problem, self.fusion.mode, self.models, (int(img.shape[0]), int(img.shape[1]))
                )
                continue
            s = time.perf_counter()
            work, scale = working_image(img, self.working_size)
            t["resize"] = time.perf_counter() - s
            s = time.perf_counter()
            clahe_c = apply_clahe(work, cp)
            clahe_d = clahe_c if self._shared_clahe else apply_clahe(work, dp)
            t["clahe"] = time.perf_counter() - s
            s = time.perf_counter()
            xc, _ = to_model_input(clahe_c, cp)
            t["classifier_input"] = time.perf_counter() - s
            t["total"] = time.perf_counter() - t0
            prepared[k] = (img, xc, clahe_d, scale)

        order = list(prepared)
        p_abnormal: dict[int, float] = {}
        for chunk in _chunks(order, batch_size):
            s = time.perf_counter()
            probs = self.classifier.predict(np.stack([prepared[k][1] for k in chunk]), [views[k] for k in chunk])
            share = (time.perf_counter() - s) / len(chunk)
            for k, p in zip(chunk, probs):
                p_abnormal[k] = float(p)
                timings[k]["classifier"] = share

        detections: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        wanted = [k for k in order if detector_needed(p_abnormal[k], self.fusion)]
        for k in order:
            timings[k]["detector_input"] = timings[k]["detector"] = 0.0
        for chunk in _chunks(wanted, batch_size):
            xs, geoms = [], []
            for k in chunk:
                s = time.perf_counter()
                xd, geom = to_model_input(prepared[k][2], dp)
                timings[k]["detector_input"] = time.perf_counter() - s
                xs.append(xd)
                geoms.append(geom)
            s = time.perf_counter()
            found = self.detector.detect_batch(
                xs, geoms, conf=self.fusion.detector_conf, max_det=max(300, self.fusion.max_findings)
            )
            share = (time.perf_counter() - s) / len(chunk)
            for k, dets in zip(chunk, found):
                img, _, _, (fx, fy) = prepared[k]
                boxes = dets.boxes
                if (fx, fy) != (1.0, 1.0):  # working-image pixels -> source pixels
                    boxes = np.minimum(
                        boxes * np.array([fx, fy, fx, fy]),
                        np.array([img.shape[1], img.shape[0], img.shape[1], img.shape[0]], float),
                    )
                detections[k] = (boxes, dets.scores, dets.class_ids)
                timings[k]["detector"] = share

        for k in order:
            img = prepared[k][0]
            t = timings[k]
            s = time.perf_counter()
            if k in detections:
                findings, p_no_finding = fuse(p_abnormal[k], *detections[k], self.fusion)
            else:
                findings, p_no_finding = fuse(p_abnormal[k], None, None, None, self.fusion)
            t["fusion"] = time.perf_counter() - s
            t["total"] += sum(t[key] for key in ("classifier", "detector_input", "detector", "fusion"))
            preds[k] = Prediction(
                p_abnormal=p_abnormal[k],
                p_no_finding=float(p_no_finding),
                findings=findings,
                fusion_mode=self.fusion.mode,
                models=self.models,
                image_size=(int(img.shape[0]), int(img.shape[1])),
                timings_s=t,
            )
        return [p for p in preds if p is not None]

    @staticmethod
    def limit_threads(n: int) -> None:
        """Convenience for small machines: cap torch's intra-op threads."""
        torch.set_num_threads(max(1, int(n)))
