"""Training the normal/abnormal classifier (timm, 1 channel, 1 logit, BCE).

Inputs go through the inference code path: intensity normalisation and CLAHE
(``inference.preprocess.apply_clahe``, skipped for files exported CLAHE'd) -> ``letterbox`` ->
``normalise``; training images are augmented before (site differences) and after (geometry) that path
(:mod:`inference.training.augment`); validation inputs are exactly ``to_model_input``.

Every (view, label) cell gets the same share of each epoch (``balance_views``), and the best epoch is
the one whose *worst view* has the highest validation ROC AUC (``select="worst_view"``), so a model
that is good on PA films and poor on AP ones is not chosen.

Each epoch writes ``OUT/last.pt`` (model, optimizer, AMP scaler, best weights so far, history);
``resume=True`` continues from it. At the end the abnormal-decision threshold is chosen on the
validation set (Youden's J, a target sensitivity, or a target sensitivity reached in every view)
and the model file is written with :func:`inference.modelfile.save_model_file`; its metadata
carries the architecture, preprocessing, threshold (``extra["abnormal_threshold"]``), validation metrics
and a description of the training data.
"""

from __future__ import annotations

import logging
import math
import os
import random
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler

from inference.classifier import build_classifier
from inference.errors import DatasetError
from inference.modelfile import ModelMetadata, save_model_file
from inference.preprocess import PreprocessParams, apply_clahe, letterbox, normalise
from inference.training.augment import AugmentConfig, geometry_augment, site_augment
from inference.training.data.images import load_clahe01, load_working
from inference.training.data.sample import Sample, describe
from inference.training.metrics import binary_metrics, choose_threshold

log = logging.getLogger(__name__)


class _RunState(TypedDict):
    """Progress of a training run; saved in (and restored from) the ``last.pt`` checkpoint."""

    epoch: int  # last finished epoch (0-based), -1 before the first
    best_auc: float
    best_epoch: int  # 0-based, -1 before the first
    best_state: dict[str, Any] | None  # state_dict of the best epoch
    history: list[dict[str, float]]


@dataclass
class ClassifierTrainConfig:
    arch: str = "efficientnet_b0"
    input_size: int = 384
    epochs: int = 20
    batch: int = 32
    lr: float = 3e-4
    weight_decay: float = 0.0
    schedule: str = "cosine"  # "cosine" or "constant"
    pos_weight: float | None = None  # BCE pos_weight; None = 1
    rotation_deg: float = 10.0
    augment: str = "site"  # "site": every augmentation of inference.training.augment; "geometry": rotation etc.
    intensity: str = "rank"  # input intensity normalisation (PreprocessParams.intensity)
    drop_rate: float = 0.0  # dropout before the head
    balance_views: bool = True  # sample every (view, label) cell equally
    select: str = "worst_view"  # best epoch by "worst_view" validation AUC or overall "auc"
    device: str = "cpu"
    amp: bool = True  # used on cuda only
    seed: int = 0
    workers: int = 0
    threshold_method: str = "youden"  # or "sensitivity", "sensitivity_per_view"
    target_sensitivity: float = 0.9
    version: str = "0.1.0"
    clahe_clip_limit: float = 2.0
    clahe_tile_grid: int = 8
    channels: int = 1  # 3: grey repeated, as ImageNet-pretrained networks expect
    normalize: str = "node"  # "node": mean 0.5, std 0.25; "imagenet": ImageNet's per-channel mean and std
    init_weights: str | None = None  # start from these weights (inference.training.init_weights)

    def augment_config(self) -> AugmentConfig:
        if self.augment == "none":
            return AugmentConfig.none()
        base = AugmentConfig() if self.augment == "site" else AugmentConfig.none()
        return replace(base, rotation_deg=self.rotation_deg, scale=(0.9, 1.1), translate=0.06)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


class CXRDataset(Dataset):
    """Training/validation images for the classifier.

    Without augmentation the model inputs (intensity-normalised, CLAHE'd, letterboxed) are computed once and
    cached as uint8. With augmentation the raw images are cached and every item runs the whole input path
    again: :func:`site_augment` on the raw image -> :func:`apply_clahe` (intensity normalisation + CLAHE, as at
    inference) -> letterbox -> :func:`geometry_augment` -> normalise. Augmentation is seeded per
    (seed, epoch, index), so a resumed run sees the same images.
    """

    def __init__(
        self,
        samples: list[Sample],
        params: PreprocessParams,
        cfg: ClassifierTrainConfig,
        augment: bool,
        desc: str = "caching",
    ):
        from tqdm.auto import tqdm

        self.params, self.cfg, self.augment, self.epoch = params, cfg, augment, 0
        self.aug = cfg.augment_config()
        self.labels = np.asarray([s.label for s in samples], dtype=np.float32)
        self.samples = samples
        self.images: list[np.ndarray] = []
        for s in tqdm(samples, desc=desc, unit="img", leave=False):
            if augment and not s.clahe_applied:
                img = load_working(s, params)
            else:
                img, _ = letterbox(load_clahe01(s, params), params.input_size, params.pad_value)
            self.images.append(np.rint(img * 255).astype(np.uint8))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        img = self.images[i].astype(np.float32) / 255.0
        if self.augment:
            rng = np.random.default_rng((self.cfg.seed, self.epoch, i))
            if not self.samples[i].clahe_applied:
                img = apply_clahe(site_augment(img, rng, self.aug), self.params)
                img, _ = letterbox(img, self.params.input_size, self.params.pad_value)
            img = geometry_augment(img, rng, self.aug, self.params.pad_value)
        x = normalise(np.repeat(img[None], self.params.channels, axis=0), self.params.mean, self.params.std)
        return torch.from_numpy(np.ascontiguousarray(x)), torch.tensor(self.labels[i])


def balanced_weights(samples: list[Sample]) -> np.ndarray:
    """Sampling weights that give every (view, label) cell the same share of an epoch."""
    cells = [(s.view or "unknown", s.label) for s in samples]
    counts: dict[tuple, int] = {}
    for c in cells:
        counts[c] = counts.get(c, 0) + 1
    return np.asarray([1.0 / counts[c] for c in cells], dtype=np.float64)


MIN_PER_VIEW_CLASS = 10  # a view needs this many normal and abnormal images to count on its own


def _view_counts_enough(samples: list[Sample], idx: list[int]) -> bool:
    pos = sum(samples[i].label for i in idx)
    return min(pos, len(idx) - pos) >= MIN_PER_VIEW_CLASS


def worst_view_auc(samples: list[Sample], probs: np.ndarray) -> float:
    """The lowest ROC AUC over the views with at least MIN_PER_VIEW_CLASS images of each class (the overall AUC
    when none has)."""
    aucs = []
    for view in sorted({s.view or "unknown" for s in samples}):
        idx = [i for i, s in enumerate(samples) if (s.view or "unknown") == view]
        if _view_counts_enough(samples, idx):
            aucs.append(binary_metrics([samples[i].label for i in idx], probs[idx], 0.5)["roc_auc"])
    if not aucs:
        return float(binary_metrics([s.label for s in samples], probs, 0.5)["roc_auc"])
    return float(min(aucs))


def per_view_threshold(samples: list[Sample], probs: np.ndarray, target_sensitivity: float) -> float:
    """The highest threshold that reaches ``target_sensitivity`` in every view (the lowest per-view one; views
    with fewer than MIN_PER_VIEW_CLASS images of a class do not count)."""
    thresholds = []
    for view in sorted({s.view or "unknown" for s in samples}):
        idx = [i for i, s in enumerate(samples) if (s.view or "unknown") == view]
        if _view_counts_enough(samples, idx):
            thresholds.append(
                choose_threshold([samples[i].label for i in idx], probs[idx], "sensitivity", target_sensitivity)
            )
    if not thresholds:
        return choose_threshold([s.label for s in samples], probs, "sensitivity", target_sensitivity)
    return float(min(thresholds))


def _init_head(model: nn.Module, prior: float) -> None:
    """Zero head weights and bias = logit(share of abnormal): training starts calibrated and stable."""
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if isinstance(head, nn.Linear):
        p = min(max(prior, 1e-3), 1 - 1e-3)
        with torch.no_grad():
            head.weight.zero_()
            if head.bias is not None:
                head.bias.fill_(math.log(p / (1 - p)))


def _amp_ctx(device: torch.device, enabled: bool):
    if device.type == "cuda" and enabled:
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return torch.autocast(device.type, enabled=False)


@torch.no_grad()
def predict_dataset(
    model: nn.Module, ds: CXRDataset, device: torch.device, batch: int, amp: bool, workers: int = 0
) -> np.ndarray:
    model.eval()
    out = []
    for x, _ in DataLoader(ds, batch_size=batch, shuffle=False, num_workers=workers):
        with _amp_ctx(device, amp):
            out.append(torch.sigmoid(model(x.to(device, non_blocking=True)).float().reshape(-1)).cpu())
    return torch.cat(out).numpy() if out else np.zeros(0)


def _save_atomic(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _per_view(samples: list[Sample], probs: np.ndarray, thr: float) -> dict:
    out = {}
    for view in sorted({s.view or "unknown" for s in samples}):
        idx = [i for i, s in enumerate(samples) if (s.view or "unknown") == view]
        out[view] = binary_metrics([samples[i].label for i in idx], probs[idx], thr)
    return out


@dataclass
class _Fit:
    """What a training step needs: the model, its optimiser, the AMP scaler (cuda only) and the loss."""

    model: nn.Module
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    loss_fn: nn.Module
    device: torch.device
    use_amp: bool


def train_classifier(
    train: list[Sample],
    val: list[Sample],
    out_dir: str | Path,
    cfg: ClassifierTrainConfig | None = None,
    resume: bool = False,
    model_path: str | Path | None = None,
    training_data: str = "",
) -> dict:
    """Train, keep the best-AUC epoch, choose the threshold, write the model file.

    Returns ``{"model_path", "best_epoch", "val": metrics at the threshold, "history"}``.
    """
    cfg = cfg or ClassifierTrainConfig()
    _check_sets(train, val, cfg)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model_path = Path(model_path) if model_path else out_dir / "classifier.pt"
    ckpt_path = out_dir / "last.pt"
    seed_everything(cfg.seed)
    params = _preprocess_params(cfg)
    fit = _set_up(cfg, train, warm_start=not (resume and ckpt_path.is_file()))
    state = _start_state(fit, cfg, ckpt_path, resume)
    train_ds = CXRDataset(train, params, cfg, augment=True, desc="train images")
    val_ds = CXRDataset(val, params, cfg, augment=False, desc="val images")
    gen = torch.Generator()
    for epoch in range(state["epoch"] + 1, cfg.epochs):
        lr = _set_lr(fit.opt, cfg, epoch)
        train_loss = _train_epoch(fit, _epoch_loader(train_ds, cfg, epoch, gen, fit.device), cfg, epoch)
        row = _validate(fit, val_ds, cfg, epoch, lr, train_loss)
        _record_epoch(state, row, fit.model, cfg, epoch)
        _report_epoch(state, row, cfg, epoch)
        _save_checkpoint(state, fit, cfg, ckpt_path)

    probs = _best_val_probs(fit, state, val_ds, cfg, ckpt_path)
    thr = _abnormal_threshold(cfg, val, val_ds.labels, probs)
    val_m = binary_metrics(val_ds.labels, probs, thr)
    md = _metadata(cfg, params, train, val, training_data, state, probs, thr, val_m)
    save_model_file(model_path, md, fit.model.state_dict())
    print(
        f"classifier written to {model_path}: best epoch {state['best_epoch'] + 1}, val AUC "
        f"{val_m['roc_auc']:.4f}, threshold {thr:.4f} (sens {val_m['sensitivity']:.3f}, "
        f"spec {val_m['specificity']:.3f})",
        flush=True,
    )
    return {
        "model_path": model_path,
        "best_epoch": state["best_epoch"] + 1,
        "val": val_m,
        "threshold": thr,
        "history": state["history"],
    }


def _check_sets(train: list[Sample], val: list[Sample], cfg: ClassifierTrainConfig) -> None:
    """Raise :class:`DatasetError` unless the train and val sets can train a classifier with ``cfg``."""
    if not train or not val:
        raise DatasetError(f"classifier training needs train and val images (got {len(train)} / {len(val)})")
    if len({s.label for s in train}) < 2 or len({s.label for s in val}) < 2:
        raise DatasetError("train and val sets must both hold normal and abnormal images")
    if cfg.intensity != "none" and any(s.clahe_applied for s in train + val):
        raise DatasetError(
            f"intensity normalisation ({cfg.intensity}) comes before CLAHE, but some images were exported "
            "CLAHE'd: export them raw (--export-raw) or train with --intensity none"
        )


def _preprocess_params(cfg: ClassifierTrainConfig) -> PreprocessParams:
    """The model's input preprocessing (saved in the model file)."""
    params = PreprocessParams.for_classifier(
        cfg.input_size,
        clahe_clip_limit=cfg.clahe_clip_limit,
        clahe_tile_grid=cfg.clahe_tile_grid,
        intensity=cfg.intensity,
    )
    if cfg.channels != 1 or cfg.normalize != "node":
        from inference.importing import IMAGENET_MEAN, IMAGENET_STD

        imagenet = cfg.normalize == "imagenet"
        mean = (IMAGENET_MEAN if cfg.channels == 3 else sum(IMAGENET_MEAN) / 3) if imagenet else params.mean
        std = (IMAGENET_STD if cfg.channels == 3 else sum(IMAGENET_STD) / 3) if imagenet else params.std
        params = params.with_(channels=cfg.channels, mean=mean, std=std)
    return params


def _set_up(cfg: ClassifierTrainConfig, train: list[Sample], warm_start: bool) -> _Fit:
    """The model on its device, its optimiser, AMP scaler and loss; ``warm_start``: load ``cfg.init_weights``
    (there is no checkpoint to resume)."""
    device = torch.device(cfg.device)
    use_amp = cfg.amp and device.type == "cuda"
    model = _build_model(cfg, train, warm_start).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scaler = (
        torch.amp.GradScaler("cuda", enabled=use_amp and not torch.cuda.is_bf16_supported())
        if device.type == "cuda"
        else None
    )
    pos_w = torch.tensor([cfg.pos_weight], device=device) if cfg.pos_weight else None
    return _Fit(model, opt, scaler, nn.BCEWithLogitsLoss(pos_weight=pos_w), device, use_amp)


def _build_model(cfg: ClassifierTrainConfig, train: list[Sample], warm_start: bool) -> nn.Module:
    model = build_classifier(cfg.arch, in_chans=cfg.channels, drop_rate=cfg.drop_rate)
    fresh_head = True
    if cfg.init_weights and warm_start:
        fresh_head = _load_init_weights(model, cfg.init_weights)
    if fresh_head:
        _init_head(model, float(np.mean([s.label for s in train])))
    return model


def _load_init_weights(model: nn.Module, path: str) -> bool:
    """Load the weights of ``path`` that fit ``model``; True when the head's did not (an ImageNet head does not
    fit; a previous run's does)."""
    from inference.training.init_weights import load_matching, read_weights

    _, left = load_matching(model, read_weights(path), path)
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    head_names = {n for n, q in model.named_parameters() if head is not None and any(q is h for h in head.parameters())}
    return bool(head_names & set(left))


def _start_state(fit: _Fit, cfg: ClassifierTrainConfig, ckpt_path: Path, resume: bool) -> _RunState:
    """A new run's state, or (``resume`` and a checkpoint there) the checkpoint's, loaded into ``fit``."""
    if resume and ckpt_path.is_file():
        return _load_checkpoint(fit, cfg, ckpt_path)
    if resume:
        log.warning("--resume: %s not found, starting a new run", ckpt_path)
    return {"epoch": -1, "best_auc": -1.0, "best_epoch": -1, "best_state": None, "history": []}


def _load_checkpoint(fit: _Fit, cfg: ClassifierTrainConfig, ckpt_path: Path) -> _RunState:
    ck = torch.load(ckpt_path, map_location=fit.device, weights_only=False)
    if (ck["config"]["arch"], ck["config"]["input_size"]) != (cfg.arch, cfg.input_size):
        raise DatasetError(
            f"{ckpt_path} is a {ck['config']['arch']}@{ck['config']['input_size']} run; "
            f"cannot resume it as {cfg.arch}@{cfg.input_size}"
        )
    fit.model.load_state_dict(ck["model"])
    fit.opt.load_state_dict(ck["optimizer"])
    if fit.scaler is not None and ck.get("scaler"):
        fit.scaler.load_state_dict(ck["scaler"])
    state = _RunState(
        epoch=ck["epoch"],
        best_auc=ck["best_auc"],
        best_epoch=ck["best_epoch"],
        best_state=ck["best_state"],
        history=ck["history"],
    )
    log.info("resuming %s after epoch %d (best AUC %.4f)", ckpt_path, state["epoch"] + 1, state["best_auc"])
    return state


def _set_lr(opt: torch.optim.Optimizer, cfg: ClassifierTrainConfig, epoch: int) -> float:
    """Set (and return) the learning rate of ``epoch`` (0-based)."""
    lr = cfg.lr if cfg.schedule == "constant" else cfg.lr * 0.5 * (1 + math.cos(math.pi * epoch / cfg.epochs))
    for g in opt.param_groups:
        g["lr"] = lr
    return lr


def _epoch_loader(
    train_ds: CXRDataset, cfg: ClassifierTrainConfig, epoch: int, gen: torch.Generator, device: torch.device
) -> DataLoader:
    """The training images of ``epoch``, augmented and sampled as seeded for that epoch."""
    train_ds.epoch = epoch
    gen.manual_seed(cfg.seed * 100003 + epoch)
    sampler = (
        WeightedRandomSampler(
            balanced_weights(train_ds.samples).tolist(), len(train_ds.samples), replacement=True, generator=gen
        )
        if cfg.balance_views
        else None
    )
    return DataLoader(
        train_ds,
        batch_size=cfg.batch,
        shuffle=sampler is None,
        sampler=sampler,
        generator=gen,
        drop_last=False,
        num_workers=cfg.workers,
        pin_memory=device.type == "cuda",
    )


def _train_epoch(fit: _Fit, loader: DataLoader, cfg: ClassifierTrainConfig, epoch: int) -> float:
    """One pass over ``loader``; returns the mean training loss."""
    from tqdm.auto import tqdm

    fit.model.train()
    total, n = 0.0, 0
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch", leave=False)
    for x, y in bar:
        x, y = x.to(fit.device, non_blocking=True), y.to(fit.device, non_blocking=True)
        with _amp_ctx(fit.device, fit.use_amp):
            loss = fit.loss_fn(fit.model(x).float().reshape(-1), y)
        _step(fit, loss)
        total += float(loss.detach()) * len(y)
        n += len(y)
        bar.set_postfix(loss=f"{total / n:.4f}")
    return total / max(n, 1)


def _step(fit: _Fit, loss: torch.Tensor) -> None:
    """Back-propagate ``loss`` and update the weights (through the AMP scaler when it is on)."""
    fit.opt.zero_grad(set_to_none=True)
    if fit.scaler is not None and fit.scaler.is_enabled():
        fit.scaler.scale(loss).backward()
        fit.scaler.step(fit.opt)
        fit.scaler.update()
    else:
        loss.backward()
        fit.opt.step()


def _validate(
    fit: _Fit, val_ds: CXRDataset, cfg: ClassifierTrainConfig, epoch: int, lr: float, train_loss: float
) -> dict[str, float]:
    """The history row of ``epoch``: its learning rate, training loss and validation metrics."""
    probs = predict_dataset(fit.model, val_ds, fit.device, cfg.batch, fit.use_amp, cfg.workers)
    m = binary_metrics(val_ds.labels, probs, 0.5)
    return {
        "epoch": epoch + 1,
        "lr": lr,
        "train_loss": train_loss,
        "val_auc": m["roc_auc"],
        "val_worst_view_auc": worst_view_auc(val_ds.samples, probs),
        "val_accuracy@0.5": m["accuracy"],
    }


def _record_epoch(
    state: _RunState, row: dict[str, float], model: nn.Module, cfg: ClassifierTrainConfig, epoch: int
) -> None:
    """Add ``row`` to the history and keep the model's weights when the epoch is the best so far."""
    state["history"].append(row)
    score = row["val_worst_view_auc"] if cfg.select == "worst_view" else row["val_auc"]
    auc = score if score == score else 0.0
    if auc > state["best_auc"]:
        state.update(
            {
                "best_auc": auc,
                "best_epoch": epoch,
                "best_state": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
            }
        )
    state["epoch"] = epoch


def _report_epoch(state: _RunState, row: dict[str, float], cfg: ClassifierTrainConfig, epoch: int) -> None:
    log.info(
        "epoch %d/%d loss %.4f val AUC %.4f, worst view %.4f (best %.4f @ %d)",
        epoch + 1,
        cfg.epochs,
        row["train_loss"],
        row["val_auc"],
        row["val_worst_view_auc"],
        state["best_auc"],
        state["best_epoch"] + 1,
    )
    print(
        f"epoch {epoch + 1}/{cfg.epochs}: train loss {row['train_loss']:.4f}  val AUC {row['val_auc']:.4f}"
        f"  worst view {row['val_worst_view_auc']:.4f}"
        f"  (best {cfg.select} {state['best_auc']:.4f} at epoch {state['best_epoch'] + 1})",
        flush=True,
    )


def _save_checkpoint(state: _RunState, fit: _Fit, cfg: ClassifierTrainConfig, ckpt_path: Path) -> None:
    _save_atomic(
        {
            **state,
            "model": fit.model.state_dict(),
            "optimizer": fit.opt.state_dict(),
            "scaler": fit.scaler.state_dict() if fit.scaler is not None else None,
            "config": asdict(cfg),
        },
        ckpt_path,
    )


def _best_val_probs(
    fit: _Fit, state: _RunState, val_ds: CXRDataset, cfg: ClassifierTrainConfig, ckpt_path: Path
) -> np.ndarray:
    """Load the best epoch's weights into the model and return its validation probabilities."""
    if state["best_state"] is None:
        raise DatasetError(f"no epoch was trained (epochs={cfg.epochs}; {ckpt_path} already finished?)")
    fit.model.load_state_dict(state["best_state"])
    return predict_dataset(fit.model, val_ds, fit.device, cfg.batch, fit.use_amp, cfg.workers)


def _abnormal_threshold(cfg: ClassifierTrainConfig, val: list[Sample], labels: np.ndarray, probs: np.ndarray) -> float:
    if cfg.threshold_method == "sensitivity_per_view":
        return per_view_threshold(val, probs, cfg.target_sensitivity)
    return choose_threshold(labels, probs, cfg.threshold_method, cfg.target_sensitivity)


def _metadata(
    cfg: ClassifierTrainConfig,
    params: PreprocessParams,
    train: list[Sample],
    val: list[Sample],
    training_data: str,
    state: _RunState,
    probs: np.ndarray,
    thr: float,
    val_m: dict,
) -> ModelMetadata:
    """The model file's metadata: architecture, preprocessing, threshold, validation metrics, training data."""
    metrics = {f"val_{k}": v for k, v in val_m.items() if isinstance(v, (int, float)) and v == v}
    metrics["abnormal_threshold"] = thr
    return ModelMetadata(
        kind="classifier",
        architecture=cfg.arch,
        preprocess=params,
        version=cfg.version,
        training_data=training_data or f"train {describe(train)}; val {describe(val)}",
        metrics=metrics,
        extra={
            "abnormal_threshold": thr,
            "threshold_method": cfg.threshold_method,
            "best_epoch": state["best_epoch"] + 1,
            "train_config": asdict(cfg),
            "train_set": describe(train),
            "val_set": describe(val),
            "val_confusion": val_m["confusion"],
            "val_per_view": _per_view(val, probs, thr),
            "history": state["history"],
        },
    )
