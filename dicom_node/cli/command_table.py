"""The training commands (training, evaluation, model import and export): their names and help, in a leaf.

The main parser lists them from here without importing their code (the running node never imports training
code); :mod:`dicom_node.cli.offline` builds their own parser from the same table.
"""

from __future__ import annotations

TRAINING_COMMANDS = {
    "train": "train a model (classifier or detector) on VinBigData or the NIH sets",
    "evaluate": "evaluate classifier + detector (both fusion modes) on a held-out split",
    "tune-detector": "choose on validation data which detector classes are reported and from what confidence",
    "calibrate": "choose the classifier's operating point per view on a site's own labelled images",
    "audit": "can nuisance (view, brightness, sharpness) alone tell the classes of a training set apart?",
    "import-model": "turn an ultralytics, timm or ONNX model into a dicom-node model file",
    "export-onnx": "write the ONNX export of a model file beside it (for inference.models.backend: onnxruntime)",
}
