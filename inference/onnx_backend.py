"""The ONNX Runtime backend (``inference.models.backend: onnxruntime``).

The network runs in ONNX Runtime; everything around it (CLAHE, letterbox, normalisation, NMS, fusion) is the
same code as with torch, so both backends give the same boxes and probabilities within float tolerance
(``tests/test_import_models.py``). The graph comes from one of two places:

- an **export beside the model file**: ``dicom-node export-onnx models/detector.pt`` writes
  ``models/detector.onnx``, which records the sha256 of the model file it was made from; the node refuses an
  export that does not match its model file (a model replaced without exporting again);
- an **ONNX model imported** with ``dicom-node import-model --format onnx``: the graph is stored inside the
  node's model file (there are no torch weights), so that model always runs in ONNX Runtime.

``export-onnx --int8`` writes a statically quantised export instead (:func:`quantize_int8`); the node then
reports the model with "+int8" in its version and the export's sha256. On 2 CPU cores, float32 ONNX Runtime takes
about 0.8x the torch time for the shipped models, with an int8 detector about 0.55x, with both int8 about 0.45x
(``bench/pipeline.py --backend both``, on a CPU with AVX-512 VNNI). On an x86 CPU without VNNI (AVX2 only) the
int8 exports get 7-bit weights (:func:`int8_kernels_saturate`). On a GPU, the CUDA execution provider is used when
the installed onnxruntime has it.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from inference.errors import ModelError

log = logging.getLogger(__name__)

SOURCE_KEY = "dicom_node_source_sha256"  # ONNX metadata_props: the model file an export was made from
PRECISION_KEY = "dicom_node_precision"  # "int8" for a quantised export (absent: float32)
CALIBRATION_KEY = "dicom_node_int8_calibration"  # what the int8 ranges were measured on
OPSET = 17


def export_path(model_file: str | os.PathLike) -> Path:
    """Where ``export-onnx`` puts a model file's export: the same name with ``.onnx``."""
    return Path(model_file).with_suffix(".onnx")


def export_onnx(model: torch.nn.Module, channels: int, size: int, out: str | os.PathLike, source_sha256: str) -> Path:
    """Export a network in eval mode (batch size dynamic) and record the model file it came from."""
    import onnx

    out = Path(out)
    model = model.eval().float().cpu()
    for m in model.modules():  # ultralytics heads: return the decoded (N, 4 + nc, anchors) tensor only
        if type(m).__name__ in ("Detect", "v10Detect"):
            m.export, m.format = True, "onnx"
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    try:
        with torch.no_grad():
            torch.onnx.export(
                model,
                (torch.zeros(1, channels, size, size),),
                str(tmp),
                input_names=["images"],
                output_names=["output"],
                dynamic_axes={"images": {0: "batch"}, "output": {0: "batch"}},
                opset_version=OPSET,
                dynamo=False,
            )
        graph = onnx.load(str(tmp))
        prop = graph.metadata_props.add()
        prop.key, prop.value = SOURCE_KEY, source_sha256
        onnx.save(graph, str(tmp))
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return out


def _set_metadata(graph, items: dict[str, str]) -> None:
    keep = [p for p in graph.metadata_props if p.key not in items]
    del graph.metadata_props[:]
    graph.metadata_props.extend(keep)
    for key, value in items.items():
        prop = graph.metadata_props.add()
        prop.key, prop.value = key, value


def _unactivated_convs(graph) -> list[str]:
    """Convolutions whose output no activation follows: in a YOLO head, the layers that emit the box
    distributions and the class logits (and the fixed DFL convolution)."""
    activations = {"Sigmoid", "Relu", "LeakyRelu", "HardSwish", "HardSigmoid", "Tanh", "Clip", "Elu", "Gelu"}
    consumers: dict[str, set[str]] = {}
    for node in graph.graph.node:
        for i in node.input:
            consumers.setdefault(i, set()).add(node.op_type)
    return [
        n.name for n in graph.graph.node if n.op_type == "Conv" and not consumers.get(n.output[0], set()) & activations
    ]


@functools.cache
def int8_kernels_saturate() -> bool:
    """Whether ONNX Runtime's int8 convolutions can saturate on this CPU: an x86 CPU without VNNI (AVX2 only, e.g.
    AMD EPYC before Zen 4, Xeons before Cascade Lake). There its uint8 x int8 kernels add pairs of 8-bit products
    in 16 bits (``vpmaddubsw``), and with 8-bit weights a pair can exceed 32767: the sum is clipped, and a strong
    finding can vanish (the shipped detector lost a 0.75 box on such a CPU, while the same int8 graph, run without
    the int8 kernels, kept it within 0.13). With 7-bit weights (``reduce_range``) no pair can overflow. VNNI
    (``avx512_vnni``, ``avx_vnni``) multiplies and accumulates in 32 bits, and other architectures (ARM) have no
    such kernel. An x86 CPU whose flags cannot be read (no ``/proc/cpuinfo``) counts as saturating."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686", "x86"):
        return False
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return True
    return re.search(r"\b(avx512_vnni|avx_vnni)\b", cpuinfo) is None


def quantize_int8(
    src: str | os.PathLike,
    out: str | os.PathLike,
    inputs: Iterable[np.ndarray],
    calibration: str,
    detector: bool = False,
    reduce_range: bool = False,
) -> Path:
    """Statically quantise a float32 export to int8 (QDQ, per-channel weights, activation ranges measured on
    ``inputs``: prepared N x C x S x S batches of real radiographs, as the network sees them).

    Only the convolutions are quantised. In a detector (``detector=True``) the head's output convolutions stay
    float32, and so does its decoding (anchors, DFL, box arithmetic, sigmoid, the concatenation of pixel
    coordinates with [0, 1] scores): an 8-bit range measured on calibration films clips the class logits of a
    film that looks unlike them (a strong finding's score would come out as sigmoid(clipped) = 0.5). The
    source's metadata (the model file it was made from) is kept, and ``dicom_node_precision: int8`` with
    ``calibration`` (what the ranges were measured on) is added. ``reduce_range``: 7-bit weights, which avoid the
    saturation of ONNX Runtime's int8 kernels on x86 CPUs without VNNI (AVX2 only), at some cost in precision. They
    are used whenever the CPU doing the export is such a CPU (:func:`int8_kernels_saturate`), asked or not: an
    export is made on the machine that will serve it (README), and 8-bit weights would give wrong results there."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    src, out = Path(src), Path(out)
    if not reduce_range and int8_kernels_saturate():
        log.warning(
            "%s: this CPU has no VNNI (AVX2 only), where ONNX Runtime's 8-bit kernels can saturate: 7-bit weights",
            out.name,
        )
        reduce_range = True
    graph = onnx.load(str(src))
    name = graph.graph.input[0].name
    meta = {p.key: p.value for p in graph.metadata_props}
    keep_float = _unactivated_convs(graph) if detector else []

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(inputs)

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self.batches, None)
            return None if batch is None else {name: np.ascontiguousarray(batch, dtype=np.float32)}

    tmp_pre = out.with_name(f".{out.name}.pre{os.getpid()}")
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    try:
        quant_pre_process(str(src), str(tmp_pre), skip_symbolic_shape=True)
        quantize_static(
            str(tmp_pre),
            str(tmp),
            Reader(),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=["Conv"],
            nodes_to_exclude=keep_float,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            reduce_range=reduce_range,
        )
        q = onnx.load(str(tmp))
        meta.update(
            {PRECISION_KEY: "int8", CALIBRATION_KEY: calibration + (" (7-bit weights)" if reduce_range else "")}
        )
        _set_metadata(q, meta)
        onnx.save(q, str(tmp))
        os.replace(tmp, out)
    finally:
        for t in (tmp, tmp_pre):
            if t.exists():
                t.unlink()
    return out


class OnnxModule(torch.nn.Module):
    """An ONNX Runtime session that looks like the torch module it replaces: tensor in, tensor out."""

    def __init__(
        self, graph: bytes | str | os.PathLike, device: str | torch.device = "cpu", threads: int | None = None
    ):
        super().__init__()
        try:
            import onnxruntime as ort
        except ImportError as exc:  # pragma: no cover - a dependency of the package
            raise ModelError("inference.models.backend onnxruntime: the onnxruntime package is not installed") from exc
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(threads or torch.get_num_threads())
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        # no busy-waiting between runs: the classifier's and the detector's sessions (and torch, CLAHE, NMS) share
        # the cores, and spinning threads of one session slow the next step down
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        providers = ["CPUExecutionProvider"]
        if torch.device(device).type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        source = graph if isinstance(graph, bytes) else str(graph)
        self.sha256 = hashlib.sha256(graph if isinstance(graph, bytes) else Path(graph).read_bytes()).hexdigest()
        try:
            self.session = ort.InferenceSession(source, options, providers=providers)
        except Exception as exc:
            what = "the embedded ONNX graph" if isinstance(graph, bytes) else str(graph)
            raise ModelError(f"{what}: ONNX Runtime cannot load it ({type(exc).__name__}: {exc})") from exc
        # "float32", or "int8" for an export quantised with ``export-onnx --int8``
        self.precision = self.metadata.get(PRECISION_KEY, "float32")
        if (
            self.precision == "int8"
            and "7-bit" not in self.metadata.get(CALIBRATION_KEY, "")
            and self.session.get_providers()[0] == "CPUExecutionProvider"
            and int8_kernels_saturate()
        ):
            log.warning(
                "%s: an int8 export with 8-bit weights, for CPUs with VNNI; this CPU has none (AVX2 only), and ONNX "
                "Runtime's 8-bit kernels can saturate here (a strong finding can vanish): export it again on this "
                "machine (export-onnx --int8 gives 7-bit weights here)",
                "the embedded ONNX graph" if isinstance(graph, bytes) else str(graph),
            )
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.input_shape = tuple(inp.shape)

    @property
    def metadata(self) -> dict[str, str]:
        return dict(self.session.get_modelmeta().custom_metadata_map)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        arr = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())
        return torch.from_numpy(self.session.run(None, {self.input_name: arr})[0])


def session_for(model_file: Path, sha256: str, device: str | torch.device = "cpu") -> OnnxModule:
    """The export beside ``model_file``, checked to have been made from this very file."""
    path = export_path(model_file)
    if not path.is_file():
        raise ModelError(
            f"{model_file}: inference.models.backend is onnxruntime but there is no {path.name} beside it; "
            f"make it with: dicom-node export-onnx {model_file}"
        )
    module = OnnxModule(path, device)
    made_from = module.metadata.get(SOURCE_KEY)
    if made_from != sha256:
        raise ModelError(
            f"{path}: exported from another model file (sha256 {str(made_from)[:12]}..., {model_file.name} is "
            f"{sha256[:12]}...); export it again: dicom-node export-onnx {model_file}"
        )
    return module
