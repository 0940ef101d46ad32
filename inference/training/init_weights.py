"""Start training from weights a site has (``train classifier|detector --init-weights FILE``), offline.

``FILE`` may be an ImageNet checkpoint of the architecture (a timm/torchvision ``state_dict`` saved with
``torch.save``, or a ``.safetensors`` file), a previous run's dicom-node model file, or (detector) an
ultralytics checkpoint such as ``yolov8x.pt``. Every tensor whose name and shape fit the network is copied; the
rest (a 1000-class ImageNet head, a detection head for other classes) keeps its fresh initialisation and is
listed in the log. A 3-channel first convolution is folded into one channel for a 1-channel network (as timm
does). Only tensors are read (``weights_only=True``); an ultralytics checkpoint is read by ultralytics itself,
which unpickles it: use files you trust.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from inference.errors import ModelError
from inference.importing import find_state_dict
from inference.modelfile import METADATA_KEY

log = logging.getLogger(__name__)


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file (state_dict, checkpoint dict, safetensors, dicom-node model file)."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"--init-weights {path}: file not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return dict(load_file(str(path)))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelError(
            f"--init-weights {path}: not a plain weights file ({type(exc).__name__}); save its state_dict with "
            "torch.save(model.state_dict(), FILE) or import it with dicom-node import-model first"
        ) from exc
    if isinstance(obj, dict) and METADATA_KEY in obj:
        obj = obj["state_dict"]
    return find_state_dict(obj, path)


def load_matching(model: nn.Module, weights: dict[str, torch.Tensor], source: str) -> tuple[int, list[str]]:
    """Copy the tensors that fit (name and shape; a 3-to-1 channel first conv is folded); returns how many were
    copied and the names of the network's tensors left as they were. Nothing fits: ModelError."""
    own = model.state_dict()
    take: dict[str, torch.Tensor] = {}
    for name, tensor in own.items():
        w = weights.get(name)
        if w is None:
            continue
        if w.shape == tensor.shape:
            take[name] = w.to(tensor.dtype)
        elif (
            w.ndim == 4
            and tensor.ndim == 4
            and w.shape[1] == 3
            and tensor.shape[1] == 1
            and w.shape[0] == tensor.shape[0]
        ):
            take[name] = w.sum(dim=1, keepdim=True).to(tensor.dtype)  # an RGB stem for grey input
    if not take:
        raise ModelError(f"--init-weights {source}: no tensor fits this architecture (is it the right --arch?)")
    model.load_state_dict(take, strict=False)
    left = [n for n in own if n not in take and not n.endswith("num_batches_tracked")]
    log.info(
        "init weights from %s: %d of %d tensors copied; fresh: %s",
        source,
        len(take),
        len(own),
        ", ".join(left[:8]) + (" ..." if len(left) > 8 else "") or "none",
    )
    return len(take), left
