"""Site calibration: the classifier's operating point chosen on a hospital's own labelled films.

Every site validates before go-live. ``dicom-node calibrate`` runs the classifier on a local labelled set
and, per view (PA, AP, ...), picks the highest decision threshold that still reaches the target sensitivity;
the thresholds go into a calibration file (JSON) that ``config.yaml`` names
(``inference.models.calibration``). The model file is left alone.

At inference the classifier then maps the threshold of the image's view (``ViewPosition``; the ``default``
threshold when the view is missing or was not calibrated) to P(abnormal) = 0.5, exactly as it does with the
threshold stored in the model file: the ranking does not change, the operating point does. Thresholds are
on the model's raw probability scale. Choosing them: :mod:`inference.training.calibrate`.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from inference.errors import ModelError

__all__ = ["Calibration", "FORMAT"]

FORMAT = "dicom-node/calibration/1"


@dataclass(frozen=True)
class Calibration:
    default: float  # raw-probability threshold for images whose view has none of its own
    per_view: dict[str, float] = field(default_factory=dict)  # "PA" / "AP" / ... -> threshold
    target_sensitivity: float = 0.9
    model_sha256: str = ""  # the classifier the thresholds were chosen for
    data: str = ""  # what they were chosen on
    created: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    metrics: dict = field(default_factory=dict)  # sensitivity/specificity with CIs, overall and per view

    def __post_init__(self) -> None:
        for name, t in {"default": self.default, **self.per_view}.items():
            if not 0.0 < float(t) < 1.0:
                raise ModelError(f"calibration threshold {name} = {t} must lie strictly between 0 and 1")

    def threshold(self, view: str | None) -> float:
        return float(self.per_view.get((view or "").strip().upper(), self.default))

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps({"format": FORMAT, **asdict(self)}, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Calibration":
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise ModelError(f"calibration file {path} not found") from exc
        except (OSError, ValueError) as exc:
            raise ModelError(f"calibration file {path} is not readable JSON: {exc}") from exc
        if not isinstance(data, dict) or data.pop("format", None) != FORMAT:
            raise ModelError(f"{path} is not a dicom-node calibration file (format {FORMAT!r} expected)")
        try:
            return cls(**data)
        except (TypeError, ValueError) as exc:
            raise ModelError(f"calibration file {path}: {exc}") from exc
