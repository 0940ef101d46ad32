"""Training the YOLOv8 finding detector with ultralytics, offline, and converting the result.

``train_detector(data_yaml, out_dir, cfg)`` trains ``YOLO("<size>.yaml")`` from scratch
(``pretrained=False``: nothing is downloaded) with the original project's choices: optimizer Adam,
lr0 3e-4, rotation +-10 degrees, brightness (hsv_v) jitter, contrast from intensity normalisation
and CLAHE (done at export, as the node does), no hue/saturation jitter (greyscale). ``time_hours``
hands ultralytics a time budget instead of a fixed number of epochs. Runs go to
``OUT/ultralytics/train``; ``resume=True`` continues from its ``weights/last.pt``. ultralytics' AMP
self-check (which would download yolo26n.pt) is bypassed on CUDA; on CPU AMP is off anyway.

``convert_checkpoint(best_pt, model_path, ...)`` turns ultralytics' ``best.pt`` (a pickled model)
into our model file (:mod:`inference.modelfile`, kind "detector": yaml dict + float16 state dict +
metadata) and checks that it loads through :class:`inference.detector.Detector`.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from inference import ultralytics_env  # noqa: F401  (before ultralytics)
from inference.errors import DatasetError, ModelError
from inference.modelfile import ModelMetadata, save_model_file
from inference.preprocess import PreprocessParams
from inference.types import FINDING_CLASSES

log = logging.getLogger(__name__)
SIZES = ("yolov8n", "yolov8s", "yolov8m", "yolov8l", "yolov8x")


@dataclass
class DetectorTrainConfig:
    model: str = "yolov8n"  # ultralytics architecture yaml stem
    init_weights: str | None = None  # start from an ultralytics checkpoint (yolov8x.pt) or a dicom-node detector file
    epochs: int = 100
    imgsz: int = 512
    batch: int = 16
    device: str = "cpu"  # "cpu", "0", "cuda:0", ...
    seed: int = 0
    workers: int = 2
    lr0: float = 3e-4
    optimizer: str = "Adam"
    degrees: float = 10.0
    hsv_v: float = 0.4
    fliplr: float = 0.5
    mosaic: float = 1.0
    close_mosaic: int = 10
    patience: int = 100
    cache: bool = False  # cache images in RAM ("ram") when True
    amp: bool = True  # CUDA only
    verbose: bool = True  # ultralytics log + progress bars
    version: str = "0.1.0"
    clahe_clip_limit: float = 2.0
    clahe_tile_grid: int = 8
    intensity: str = "rank"  # intensity normalisation before CLAHE (PreprocessParams.intensity)
    time_hours: float = 0.0  # > 0: ultralytics fits the epochs into this much training time
    extra: dict = field(default_factory=dict)  # any other ultralytics train argument

    def train_args(self) -> dict:
        dev = self.device
        if dev.startswith("cuda"):
            dev = dev.split(":", 1)[1] if ":" in dev else "0"
        return dict(
            epochs=self.epochs,
            imgsz=self.imgsz,
            batch=self.batch,
            device=dev,
            seed=self.seed,
            workers=self.workers,
            optimizer=self.optimizer,
            lr0=self.lr0,
            degrees=self.degrees,
            hsv_h=0.0,
            hsv_s=0.0,
            hsv_v=self.hsv_v,
            fliplr=self.fliplr,
            mosaic=self.mosaic,
            close_mosaic=self.close_mosaic,
            patience=self.patience,
            cache="ram" if self.cache else False,
            amp=bool(self.amp) and dev != "cpu",
            pretrained=False,
            plots=False,
            deterministic=True,
            exist_ok=True,
            verbose=True,
            **({"time": self.time_hours} if self.time_hours > 0 else {}),
            **self.extra,
        )


@contextlib.contextmanager
def _offline_amp_check():
    """ultralytics' check_amp() downloads yolo26n.pt; trust AMP on CUDA instead (restored after)."""
    import ultralytics.engine.trainer as trainer_mod

    original = getattr(trainer_mod, "check_amp", None)

    def check_amp(model) -> bool:
        dev = next(model.parameters()).device
        return dev.type == "cuda"

    if original is not None:
        trainer_mod.check_amp = check_amp
    try:
        yield
    finally:
        if original is not None:
            trainer_mod.check_amp = original


@contextlib.contextmanager
def _ultralytics_verbose(on: bool):
    """Show ultralytics' log and progress bars during training (the node keeps them quiet)."""
    import ultralytics.utils as uu

    saved = [uu.VERBOSE, uu.LOGGER.level, [h.level for h in uu.LOGGER.handlers]]
    if on:
        uu.VERBOSE = True
        for obj in [uu.LOGGER, *uu.LOGGER.handlers]:
            obj.setLevel(logging.INFO)
    try:
        yield
    finally:
        uu.VERBOSE = saved[0]
        uu.LOGGER.setLevel(saved[1])
        for h, level in zip(uu.LOGGER.handlers, saved[2]):
            h.setLevel(level)


def _finished(last: Path) -> bool:
    """ultralytics marks a finished run's last.pt with epoch -1 (optimizer stripped)."""
    return torch.load(last, map_location="cpu", weights_only=False).get("epoch", -1) == -1


def train_detector(
    data_yaml: str | Path, out_dir: str | Path, cfg: DetectorTrainConfig | None = None, resume: bool = False
) -> Path:
    """Run ultralytics training; return the path of its best.pt."""
    from ultralytics import YOLO

    cfg = cfg or DetectorTrainConfig()
    if cfg.imgsz % 32:
        raise DatasetError(f"imgsz must be a multiple of 32, got {cfg.imgsz}")
    project = (Path(out_dir) / "ultralytics").resolve()
    run_dir = project / "train"
    last = run_dir / "weights" / "last.pt"
    with _offline_amp_check(), _ultralytics_verbose(cfg.verbose):
        if resume and last.is_file() and _finished(last):
            log.info("%s is a finished run; nothing to resume", last)
        elif resume and last.is_file():
            log.info("resuming ultralytics run %s", last)
            args = cfg.train_args()
            keep = {k: args[k] for k in ("device", "workers", "batch", "imgsz", "plots", "cache")}
            YOLO(str(last)).train(resume=True, **keep)
        else:
            if resume:
                log.warning("--resume: %s not found, starting a new run", last)
            model = YOLO(f"{cfg.model}.yaml", task="detect")
            if cfg.init_weights:
                init_from(model, cfg.init_weights)
            model.train(data=str(data_yaml), project=str(project), name="train", **cfg.train_args())
    best = run_dir / "weights" / "best.pt"
    if not best.is_file():
        best = last
    if not best.is_file():
        raise ModelError(f"ultralytics training left no checkpoint in {run_dir / 'weights'}")
    return best


def init_from(model, path: str) -> None:
    """Copy the fitting weights of ``path`` into an ultralytics ``YOLO`` before training: a dicom-node detector
    file (only tensors are read), else an ultralytics checkpoint (``YOLO.load``, which unpickles it)."""
    from inference.modelfile import METADATA_KEY
    from inference.training.init_weights import load_matching

    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - pickled: an ultralytics checkpoint
        payload = None
    if isinstance(payload, dict) and METADATA_KEY in payload:
        load_matching(model.model, payload["state_dict"], path)
        return
    if not Path(path).is_file():
        raise ModelError(f"--init-weights {path}: file not found")
    log.info("init weights from the ultralytics checkpoint %s (unpickled: a file you trust)", path)
    model.load(path)


def _metrics_of(ckpt: dict) -> dict[str, float]:
    out = {}
    for k, v in (ckpt.get("train_metrics") or {}).items():
        try:
            out[str(k).replace("metrics/", "val_").replace("(B)", "")] = float(v)
        except (TypeError, ValueError):
            pass
    return out


def convert_checkpoint(
    best_pt: str | Path,
    model_path: str | Path,
    cfg: DetectorTrainConfig,
    training_data: str = "",
    extra: dict | None = None,
) -> Path:
    """ultralytics best.pt -> dicom-node detector model file (checked by loading it back)."""
    from inference.detector import Detector

    best_pt = Path(best_pt)
    try:
        ckpt = torch.load(best_pt, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise ModelError(f"{best_pt}: not a readable ultralytics checkpoint ({exc})") from exc
    net = ckpt.get("ema") if ckpt.get("ema") is not None else ckpt.get("model")
    if net is None or not hasattr(net, "yaml"):
        raise ModelError(f"{best_pt}: no model in the ultralytics checkpoint")
    names = getattr(net, "names", None)
    if names is not None and list(dict(names).values()) != list(FINDING_CLASSES):
        raise ModelError(
            f"{best_pt}: trained class names {list(dict(names).values())[:3]}... are not the 14 VinDr-CXR classes"
        )
    state = {k: v.float() if v.is_floating_point() else v for k, v in net.float().state_dict().items()}
    yaml_dict = dict(net.yaml)
    yaml_dict["nc"] = len(FINDING_CLASSES)
    params = PreprocessParams.for_detector(
        cfg.imgsz, clahe_clip_limit=cfg.clahe_clip_limit, clahe_tile_grid=cfg.clahe_tile_grid, intensity=cfg.intensity
    )
    train_args = ckpt.get("train_args") or {}
    md = ModelMetadata(
        kind="detector",
        architecture=cfg.model,
        preprocess=params,
        classes=tuple(FINDING_CLASSES),
        version=cfg.version,
        training_data=training_data,
        metrics=_metrics_of(ckpt),
        extra={
            "ultralytics_version": ckpt.get("version"),
            "epoch": ckpt.get("epoch"),
            "best_fitness": ckpt.get("best_fitness"),
            "train_config": asdict(cfg),
            "train_args": {k: v for k, v in train_args.items() if isinstance(v, (int, float, str, bool))},
            **(extra or {}),
        },
    )
    save_model_file(model_path, md, state, model_yaml=yaml_dict)
    Detector.load(model_path)  # raises ModelError if the file does not rebuild
    return Path(model_path)
