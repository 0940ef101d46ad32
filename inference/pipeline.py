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
from inference.preprocess import apply_clahe, check_image, to_model_input, working_image
from inference.quality import input_problem
from inference.types import ModelInfo, Prediction

__all__ = ["Pipeline"]

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
        work, _ = working_image(img, self.working_size)
        return to_model_input(apply_clahe(work, self.classifier.preprocess), self.classifier.preprocess)[0]

    def run(self, img01: np.ndarray, view: str | None = None) -> Prediction:
        """``view``: the image's ViewPosition (PA, AP, ...) when known; it selects a site calibration's
        operating point (:mod:`inference.calibration`)."""
        arr = np.asarray(img01)
        if arr.ndim != 2:
            raise ValueError(
                f"the pipeline takes one 2-D greyscale image (rows, columns); got an array "
                f"of shape {arr.shape} (colour or multi-frame images are not analysed)"
            )
        t: dict[str, float] = {}
        t0 = time.perf_counter()
        img = check_image(arr, "pipeline input")
        cp, dp = self.classifier.preprocess, self.detector.preprocess
        problem = input_problem(img)
        if problem:
            return Prediction.unanalysable(
                problem, self.fusion.mode, self.models, (int(img.shape[0]), int(img.shape[1]))
            )

        s = time.perf_counter()
        work, (fx, fy) = working_image(img, self.working_size)
        t["resize"] = time.perf_counter() - s
        s = time.perf_counter()
        clahe_c = apply_clahe(work, cp)
        clahe_d = clahe_c if self._shared_clahe else apply_clahe(work, dp)
        t["clahe"] = time.perf_counter() - s

        s = time.perf_counter()
        xc, _ = to_model_input(clahe_c, cp)
        t["classifier_input"] = time.perf_counter() - s
        s = time.perf_counter()
        p_abnormal = float(self.classifier.predict(xc[None], view)[0])
        t["classifier"] = time.perf_counter() - s

        boxes = scores = class_ids = None
        t["detector_input"] = t["detector"] = 0.0
        if detector_needed(p_abnormal, self.fusion):
            s = time.perf_counter()
            xd, geom = to_model_input(clahe_d, dp)
            t["detector_input"] = time.perf_counter() - s
            s = time.perf_counter()
            dets = self.detector.detect(
                xd, geom, conf=self.fusion.detector_conf, max_det=max(300, self.fusion.max_findings)
            )
            t["detector"] = time.perf_counter() - s
            boxes, scores, class_ids = dets.boxes, dets.scores, dets.class_ids
            if (fx, fy) != (1.0, 1.0):  # working-image pixels -> source pixels
                boxes = np.minimum(
                    boxes * np.array([fx, fy, fx, fy]),
                    np.array([img.shape[1], img.shape[0], img.shape[1], img.shape[0]], float),
                )

        s = time.perf_counter()
        findings, p_no_finding = fuse(p_abnormal, boxes, scores, class_ids, self.fusion)
        t["fusion"] = time.perf_counter() - s
        t["total"] = time.perf_counter() - t0
        return Prediction(
            p_abnormal=p_abnormal,
            p_no_finding=float(p_no_finding),
            findings=findings,
            fusion_mode=self.fusion.mode,
            models=self.models,
            image_size=(int(img.shape[0]), int(img.shape[1])),
            timings_s=t,
        )

    @staticmethod
    def limit_threads(n: int) -> None:
        """Convenience for small machines: cap torch's intra-op threads."""
        torch.set_num_threads(max(1, int(n)))
