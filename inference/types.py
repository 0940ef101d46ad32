"""Plain result types shared by the pipeline, the CLI and the DICOM encoders.

Boxes are always ``(x_min, y_min, x_max, y_max)`` in *source* pixel coordinates (columns, rows)
of the image handed to the pipeline, as floats.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace

# VinDr-CXR / VinBigData class ids 0-13; 14 is "No finding".
FINDING_CLASSES: tuple[str, ...] = (
    "Aortic enlargement",
    "Atelectasis",
    "Calcification",
    "Cardiomegaly",
    "Consolidation",
    "ILD",
    "Infiltration",
    "Lung Opacity",
    "Nodule/Mass",
    "Other lesion",
    "Pleural effusion",
    "Pleural thickening",
    "Pneumothorax",
    "Pulmonary fibrosis",
)
NO_FINDING = "No finding"
NO_FINDING_ID = 14


# An image is reported abnormal when something is boxed or its P(abnormal) = 1 - P(no finding) reaches this.
ABNORMAL_OPERATING_POINT = 0.5


@dataclass(frozen=True)
class Finding:
    class_id: int  # 0-13, index into FINDING_CLASSES
    label: str  # FINDING_CLASSES[class_id]
    score: float  # fused score in [0, 1]
    box: tuple[float, float, float, float]  # x_min, y_min, x_max, y_max in source pixels
    detector_score: float  # raw detector confidence


@dataclass(frozen=True)
class ModelInfo:
    """Provenance of one model file, carried into the DICOM outputs."""

    name: str  # e.g. "classifier" / "detector"
    architecture: str  # e.g. "efficientnet_b0" / "yolov8n"
    version: str  # semantic version from the model card
    sha256: str  # of the weights file; drives the Contributing Equipment Device UID


def models_summary(models: Iterable[ModelInfo], digests: bool = False) -> str:
    """``classifier efficientnet_b0 1.0.0; detector yolov8n 1.2.0`` (version/description text of the outputs);
    with ``digests`` each model's sha256 prefix follows, ``... 1.0.0 (4f2a9c1b)`` (what a worker reports it runs)."""
    return "; ".join(
        f"{m.name} {m.architecture} {m.version}" + (f" ({m.sha256[:8]})" if digests else "") for m in models
    )


@dataclass(frozen=True)
class Prediction:
    p_abnormal: float  # classifier probability that the image is abnormal
    p_no_finding: float  # probability of "No finding" after fusion
    findings: tuple[Finding, ...]
    fusion_mode: str  # "gate" or "soft"
    models: tuple[ModelInfo, ...]
    image_size: tuple[int, int]  # (rows, columns) of the source image
    timings_s: dict[str, float] = field(default_factory=dict)
    # Why the models could not judge the image (inference.quality); then both probabilities are NaN, no findings.
    not_analysable: str = ""

    @classmethod
    def unanalysable(
        cls, reason: str, fusion_mode: str, models: tuple[ModelInfo, ...], image_size: tuple[int, int]
    ) -> "Prediction":
        nan = float("nan")
        return cls(nan, nan, (), fusion_mode, models, image_size, {}, reason)

    def rescaled(self, image_size: tuple[int, int]) -> "Prediction":
        """The same prediction for the same picture at another size (rows, columns): boxes scaled by the ratio
        of the sizes. Used when the image was decoded smaller than the source (a JPEG 2000 resolution level)."""
        rows, cols = int(image_size[0]), int(image_size[1])
        if (rows, cols) == tuple(self.image_size):
            return self
        fy, fx = rows / self.image_size[0], cols / self.image_size[1]
        findings = tuple(
            replace(
                f,
                box=(
                    min(f.box[0] * fx, cols),
                    min(f.box[1] * fy, rows),
                    min(f.box[2] * fx, cols),
                    min(f.box[3] * fy, rows),
                ),
            )
            for f in self.findings
        )
        return replace(self, findings=findings, image_size=(rows, cols))

    @property
    def abnormal(self) -> bool:
        if self.not_analysable:
            return False
        return bool(self.findings) or 1.0 - self.p_no_finding >= ABNORMAL_OPERATING_POINT

    def to_json(self) -> dict:
        d = asdict(self)
        d["findings"] = [
            {
                "label": f.label,
                "class_id": f.class_id,
                "score": round(f.score, 4),
                "detector_score": round(f.detector_score, 4),
                "box": [round(v, 1) for v in f.box],
            }
            for f in self.findings
        ]
        d["abnormal"] = None if self.not_analysable else self.abnormal
        if self.not_analysable:  # JSON has no NaN
            d["p_abnormal"] = d["p_no_finding"] = None
        return d
