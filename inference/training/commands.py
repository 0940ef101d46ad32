"""The work of the training commands (``dicom-node train classifier|detector``, ``evaluate``, ``tune-detector``,
``calibrate``, ``audit``), as functions with typed parameters; the command line (argparse, option objects) is
:mod:`dicom_node.cli.training` and :mod:`dicom_node.cli.evaluation`::

    data = DataSelection(layout="nih", data="../shared/datasets", seed=0)
    train_classifier_on(data, TrainingRun(Path("runs/classifier")), ClassifierTrainConfig(arch="resnet10t"))

Data selection (:class:`DataSelection`, every command): ``layout="nih", data="../shared/datasets"`` or
``layout="vinbigdata", csv="train.csv", images=DIR, annotations="R9"|"wbf"``. The split is by patient, seeded
(``seed``, ``split="0.7,0.15,0.15"``): training uses train/val, ``evaluate`` the held-out test split of the same
seed. A VinBigData DICOM folder must be exported to PNG first by the DICOM side
(:func:`dicom_node.training.vinbigdata_export.export_for_training` returns the exported csv and images).

Reading an image file is a parameter (``load_image``, :data:`ImageLoader`): PNG/JPEG by default; the DICOM side
passes one that reads DICOM too.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from inference.errors import DatasetError
from inference.training.data.sample import Sample, describe
from inference.training.data.split import split_by_patient, subsample

if TYPE_CHECKING:
    from inference.training.train_classifier import ClassifierTrainConfig
    from inference.training.train_detector import DetectorTrainConfig

log = logging.getLogger(__name__)
DEFAULT_DATA = "../shared/datasets"
LAYOUTS = ("nih", "nih-matched", "vinbigdata", "folder")

ImageLoader = Callable[[Path], tuple[np.ndarray, str | None]]
"""``path -> (float32 image in [0, 1], its view from the header or None)``; unreadable files raise DatasetError."""


# ----------------------------------------------------------------------------- data


@dataclass(frozen=True)
class DataSelection:
    """Which labelled images a command works on, and how they are split by patient."""

    layout: str = "nih"  # one of LAYOUTS
    data: str = DEFAULT_DATA  # nih: folder holding nih-bbox/ and nih-normal/; nih-matched: holding nih-matched/
    csv: str | None = None  # vinbigdata: train.csv; folder: labels.csv with image,label[,view,batch]
    images: str | None = None  # vinbigdata: folder of <image_id>.png|.jpg; folder: the images
    annotations: str = "R9"  # vinbigdata: a reader id (R9) or "wbf" (all readers fused)
    min_votes: int = 1  # vinbigdata wbf: readers that must agree on a box
    seed: int = 0  # split (and training) seed
    split: str = "0.7,0.15,0.15"  # train,val,test fractions (by patient)

    def fractions(self) -> tuple[float, ...]:
        try:
            return tuple(float(x) for x in str(self.split).split(","))
        except ValueError as exc:
            raise DatasetError(f"--split must be three comma-separated fractions, got {self.split!r}") from exc

    def usage_problem(self) -> str | None:
        """What is wrong with these options together, before any file is read (None: nothing)."""
        if self.layout not in ("nih", "nih-matched") and (not self.csv or not self.images):
            return f"--layout {self.layout} needs --csv and --images"
        try:
            self.fractions()
        except DatasetError as exc:
            return str(exc)
        return None


@dataclass(frozen=True)
class TrainingRun:
    """Where a training run writes, and how much of the data it uses."""

    out: Path  # run folder (checkpoints, logs, splits.json)
    model_out: str | None = None  # model file to write (default: <out>/<kind>.pt)
    resume: bool = False  # continue the run in ``out``
    limit_train: int | None = None  # at most this many training images
    limit_val: int | None = None  # at most this many validation images


@dataclass(frozen=True)
class EvaluationSettings:
    """What ``evaluate`` measures: a classifier + detector pair, in each fusion mode, on one split."""

    classifier: str  # classifier model file
    detector: str  # detector model file
    out: Path  # report folder
    calibration: str | None = None  # site calibration file to evaluate with
    modes: tuple[str, ...] = ("gate", "soft")  # fusion modes
    subset: str = "test"  # which split
    limit: int | None = None  # at most this many images
    device: str = "cpu"
    backend: str = "torch"  # as inference.models.backend
    abnormal_threshold: float | None = None  # gate threshold on the calibrated P(abnormal) (None: 0.5)
    min_score: float = 0.0  # fused-score floor
    detector_conf: float = 0.01
    max_findings: int = 100


@dataclass(frozen=True)
class TuningSettings:
    """What ``tune-detector`` tunes: which classes a detector reports, chosen on a split other than test."""

    detector: str  # detector model file to tune
    out: str  # model file to write (may be the same as detector)
    subset: str = "val"
    min_ap: float = 0.1  # AP@0.4 a class needs to be reported
    device: str = "cpu"


@dataclass(frozen=True)
class CalibrationSettings:
    """What ``calibrate`` chooses: the classifier's operating point per view, with the detector it runs beside."""

    classifier: str  # classifier model file (left unchanged)
    detector: str  # the detector the node runs with it (sets the working image size)
    out: str  # calibration file to write (JSON)
    target_sensitivity: float = 0.9  # to reach in every view
    subset: str = "test"
    device: str = "cpu"
    backend: str = "torch"


@dataclass(frozen=True)
class AuditSettings:
    """What ``audit`` runs: the confound audit tool on one split, with a model's preprocessing or the default."""

    tool: Path  # the confound audit script
    subset: str = "train"
    classifier: str | None = None  # audit with this model file's preprocessing (None: training defaults)
    boot: int = 1000  # bootstrap replicates for the CIs


def load_samples(data: DataSelection) -> tuple[list[Sample], str]:
    """(samples, description of the source) for ``data.layout``."""
    if data.layout == "nih":
        from inference.training.data.nih import DESCRIPTION, read_nih

        return read_nih(data.data), DESCRIPTION
    if data.layout == "nih-matched":
        from inference.training.data.nih import MATCHED_DESCRIPTION, read_nih_matched

        return read_nih_matched(data.data), MATCHED_DESCRIPTION
    if not data.csv or not data.images:
        raise DatasetError(f"--layout {data.layout} needs --csv and --images")
    if data.layout == "folder":
        from inference.training.data.folder import read_folder

        return read_folder(data.csv, data.images), f"local labelled set {data.csv}"
    from inference.training.data.vinbigdata import describe_source, read_vinbigdata

    return (
        read_vinbigdata(data.csv, data.images, data.annotations, min_votes=data.min_votes),
        describe_source(data.csv, data.annotations),
    )


def make_splits(data: DataSelection) -> tuple[dict[str, list[Sample]], str]:
    samples, source = load_samples(data)
    fractions = data.fractions()
    if samples and all(s.split for s in samples):  # the data set's own patient-level split
        parts = {k: [s for s in samples if s.split == k] for k in ("train", "val", "test")}
        how = "the data set's own patient-level split"
    else:
        parts = split_by_patient(samples, fractions, seed=data.seed)
        how = f"patient-level split seed {data.seed} fractions {data.split}"
    desc = f"{source}; {how}: " + "; ".join(
        f"{k} {describe(v)['images']} images / {describe(v)['patients']} patients" for k, v in parts.items()
    )
    return parts, desc


def _training_splits(data: DataSelection, run: TrainingRun) -> tuple[list[Sample], list[Sample], str]:
    """(train, val, description): the limited train and val splits, written to ``run.out/splits.json`` with the
    test split they leave out."""
    parts, desc = make_splits(data)
    train = subsample(parts["train"], run.limit_train, data.seed)
    val = subsample(parts["val"], run.limit_val, data.seed)
    run.out.mkdir(parents=True, exist_ok=True)
    splits = {"train": train, "val": val, "test": parts["test"]}
    (run.out / "splits.json").write_text(json.dumps({k: [s.image_id for s in v] for k, v in splits.items()}))
    return train, val, desc


# ----------------------------------------------------------------------------- train


def train_classifier_on(data: DataSelection, run: TrainingRun, cfg: ClassifierTrainConfig) -> None:
    from inference.training.train_classifier import train_classifier

    train, val, desc = _training_splits(data, run)
    train_classifier(train, val, run.out, cfg, resume=run.resume, model_path=run.model_out, training_data=desc)


def train_detector_on(
    data: DataSelection, run: TrainingRun, cfg: DetectorTrainConfig, *, normals: bool, export_workers: int
) -> Path:
    """Train on a YOLO export of the splits (``normals``: normal images train as backgrounds); returns the model
    file written."""
    from inference.preprocess import PreprocessParams
    from inference.training.train_detector import convert_checkpoint, train_detector
    from inference.training.yolo_dataset import export_yolo_dataset

    train, val, desc = _training_splits(data, run)
    params = PreprocessParams.for_detector(
        cfg.imgsz, clahe_clip_limit=cfg.clahe_clip_limit, clahe_tile_grid=cfg.clahe_tile_grid, intensity=cfg.intensity
    )
    data_yaml = export_yolo_dataset(
        {"train": train, "val": val},
        run.out / "yolo",
        params,
        max_size=cfg.imgsz,
        include_normals=normals,
        workers=export_workers,
    )
    best = train_detector(data_yaml, run.out, cfg, resume=run.resume)
    model_path = Path(run.model_out) if run.model_out else run.out / "detector.pt"
    convert_checkpoint(
        best, model_path, cfg, training_data=desc, extra={"train_set": describe(train), "val_set": describe(val)}
    )
    return model_path


# ----------------------------------------------------------------------------- evaluate


def evaluate_on(data: DataSelection, s: EvaluationSettings, load_image: ImageLoader | None = None) -> None:
    """Evaluate the pair in each fusion mode on ``s.subset``; the report and its plots go to ``s.out``."""
    from inference.classifier import Classifier
    from inference.detector import Detector
    from inference.fusion import FusionParams
    from inference.pipeline import Pipeline
    from inference.training.evaluate import evaluate, summary_lines

    parts, desc = make_splits(data)
    samples = subsample(parts[s.subset], s.limit, data.seed)
    # The classifier reports P(abnormal) calibrated to its stored operating point (that point maps to 0.5).
    thr = 0.5 if s.abnormal_threshold is None else s.abnormal_threshold
    clf = Classifier.load(s.classifier, s.device, s.backend)
    if s.calibration:
        from inference.calibration import Calibration

        clf.use_calibration(Calibration.load(s.calibration), s.calibration)
    det = Detector.load(s.detector, s.device, backend=s.backend)
    models = ", ".join(f"{m.architecture} {m.version}" for m in (clf.info, det.info))
    print(f"models: {models} ({s.backend})")
    predictors = {}
    for mode in s.modes:
        fp = FusionParams(
            mode=mode,
            abnormal_threshold=thr,
            min_score=s.min_score,
            detector_conf=s.detector_conf,
            max_findings=s.max_findings,
        )
        predictors[mode] = Pipeline(clf, det, fp).run
    report = evaluate(
        predictors,
        samples,
        s.out,
        classifier_threshold=thr,
        description=f"{s.subset} split of {desc}",
        load=load_image or _png_loader,
    )
    for line in summary_lines(report):
        print(line)


def _png_loader(path: Path) -> tuple[np.ndarray, str | None]:
    from inference.training.data.images import load_image01

    return load_image01(path), None


# ----------------------------------------------------------------------------- tune-detector


def tune_detector_on(data: DataSelection, s: TuningSettings) -> None:
    """Choose on ``s.subset`` which classes the detector reports; write the tuned copy to ``s.out``."""
    from inference.detector import Detector
    from inference.training.tune_detector import tune, write_tuned

    parts, desc = make_splits(data)
    det = Detector.load(s.detector, s.device)
    result = tune(det, parts[s.subset], min_ap=s.min_ap)
    for name, v in result["per_class"].items():
        if v["val_boxes"] or v["trained"]:
            print(
                f"{name:20s} AP@0.4 {v['val_ap@0.4']:.3f} ({v['val_boxes']} boxes)  floor {v['floor']:.3f}  "
                f"{'reported' if v['reportable'] else 'NOT reported'}"
            )
    path = write_tuned(s.detector, s.out, result, f"{s.subset} split of {desc}")
    print(f"{path}: reports {', '.join(result['reportable_classes']) or 'NO CLASS AT ALL (no class is supported)'}")


# ----------------------------------------------------------------------------- calibrate


def calibrate_on(data: DataSelection, s: CalibrationSettings, load_image: ImageLoader | None = None) -> None:
    """The classifier's operating point per view on ``s.subset``, written to ``s.out`` (the detector only sets the
    working image size, as in the node)."""
    from inference.pipeline import Pipeline
    from inference.quality import input_problem
    from inference.training.calibrate import choose_calibration

    parts, desc = make_splits(data)
    samples = parts[s.subset]
    # the node's own input path (input check, working size, CLAHE); the detector only sets the working size
    pipe = Pipeline.from_files(s.classifier, s.detector, device=s.device, backend=s.backend)
    load = load_image or _png_loader
    labels, probs, views, refused = [], [], [], 0
    clf = pipe.classifier
    for sample in samples:
        try:
            img, header_view = load(sample.path)
        except DatasetError as exc:
            log.warning("left out: %s", exc)
            refused += 1
            continue
        if input_problem(img):
            refused += 1
            continue
        labels.append(sample.label)
        probs.append(float(clf.predict_raw(pipe.classifier_input(img)[None])[0]))
        views.append(sample.view or header_view)
    cal = choose_calibration(labels, probs, views, s.target_sensitivity, clf.info.sha256, f"{s.subset} split of {desc}")
    cal.save(s.out)
    print(f"{len(labels)} images used" + (f", {refused} not analysable and left out" if refused else ""))
    for name, m in cal.metrics.items():
        thr = (
            f"threshold {m['threshold']:.4f}{'' if m.get('own_threshold', True) else ' (overall)'}  "
            if "threshold" in m and name != "overall"
            else ""
        )
        print(
            f"{name:8s} {thr}n {m['n']}: sensitivity {m['sensitivity']:.3f} "
            f"[{m['sensitivity_ci95'][0]:.3f}-{m['sensitivity_ci95'][1]:.3f}], specificity {m['specificity']:.3f} "
            f"[{m['specificity_ci95'][0]:.3f}-{m['specificity_ci95'][1]:.3f}]"
        )
    print(f"calibration written to {s.out}; set inference.models.calibration to it in config.yaml")


# ----------------------------------------------------------------------------- audit


def audit_on(data: DataSelection, s: AuditSettings) -> None:
    """The confound audit of ``s.subset``, with ``s.classifier``'s preprocessing (default: the training defaults)."""
    from inference.modelfile import read_metadata
    from inference.preprocess import PreprocessParams
    from inference.training.audit import run_audit

    parts, desc = make_splits(data)
    if s.classifier:
        params = read_metadata(s.classifier).preprocess
    else:
        params = PreprocessParams.for_classifier(256, intensity="rank")
    print(f"{s.subset} split of {desc}\npreprocessing: intensity {params.intensity}, CLAHE {params.clahe_clip_limit}")
    print(run_audit(parts[s.subset], params, s.tool, s.boot))
