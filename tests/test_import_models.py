"""Bring your own model (issue 12), with real checkpoints made here the ordinary way:

- ultralytics: a 1-epoch ``yolo detect train`` on a few real radiographs, its classes in VinBigData names
  spelt loosely ("CARDIOMEGALY", "pleural_effusion", "Nodule-Mass"); its ``best.pt`` and its own ONNX export;
- timm: ``davit_tiny`` (one logit) saved with ``torch.save(model.state_dict())`` and ``densenet121`` (a
  two-class softmax) saved as a training checkpoint dict from a DataParallel model, both with 3 channels;
  a ``torch.onnx.export`` of the DaViT.

Proven: ``dicom-node import-model`` turns each into a node model file; the imported model gives the same
probabilities (within 1e-5; ONNX 1e-4) and boxes (within 0.01 px) as the original framework on the same input;
class names that map to no finding are refused with a message naming them; a pickled checkpoint given to the
node directly is refused without being unpickled; ``export-onnx`` + ``backend: onnxruntime`` agree with torch;
``analyze`` and a real ``serve`` run with an imported DaViT + YOLOv8x pair.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from inference import ultralytics_env  # noqa: F401  (before ultralytics)
from inference.classifier import Classifier
from inference.detector import Detector
from inference.errors import ModelError
from inference.importing import IMAGENET_MEAN, IMAGENET_STD, import_timm, import_ultralytics, map_classes
from inference.modelfile import load_model_file, save_model_file
from inference.pipeline import Pipeline
from inference.preprocess import apply_clahe, to_model_input
from inference.types import FINDING_CLASSES
from support.dicom_factory import make_cxr
from support.node import wait_for

REPO = Path(__file__).resolve().parents[1]
XRAYS = REPO.parent / "shared" / "datasets" / "nih-matched" / "abnormal" / "images"
pytestmark = [
    pytest.mark.slow,  # trains and exports real checkpoints
    pytest.mark.skipif(not XRAYS.is_dir(), reason="../shared/datasets not present"),
]
NAMES = ["CARDIOMEGALY", "pleural_effusion", "Aortic enlargement", "Nodule-Mass", "lung  opacity"]


def dicom_node(*args: str, cwd: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dicom_node", *args], capture_output=True, text=True, cwd=cwd, timeout=timeout
    )


def analyze_film(tmp_path: Path, classifier, detector, n: int, backend: str = "torch") -> dict:
    """``dicom-node analyze`` of real radiograph ``n`` (as a PNG) with these model files: its JSON result."""
    cfg = tmp_path / "config.yaml"
    cfg.write_text(
        f"inference:\n  models:\n    classifier: {classifier}\n    detector: {detector}\n    backend: {backend}\n"
        f"storage:\n  root: {tmp_path / 'var'}\n"
    )
    film = tmp_path / "chest.png"
    cv2.imwrite(str(film), (xray(n) * 255).astype(np.uint8))
    r = dicom_node("analyze", "--config", str(cfg), str(film), "-o", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    return json.loads((tmp_path / "out" / "chest.json").read_text())


def xray(n: int = 0) -> np.ndarray:
    """A real radiograph as the pipeline takes it (float32 in [0, 1])."""
    return cv2.imread(str(sorted(XRAYS.glob("*.jpg"))[n]), cv2.IMREAD_GRAYSCALE).astype(np.float32) / 255


@pytest.fixture(scope="module")
def yolo_run(tmp_path_factory) -> Path:
    """best.pt (and best.onnx) of a 1-epoch ultralytics run on 4 real radiographs at 64 px."""
    from ultralytics import YOLO

    root = tmp_path_factory.mktemp("yolo")
    for split in ("train", "val"):
        for i, film in enumerate(sorted(XRAYS.glob("*.jpg"))[:4]):
            (root / split / "images").mkdir(parents=True, exist_ok=True)
            (root / split / "labels").mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(root / split / "images" / f"{i}.png"), cv2.resize(cv2.imread(str(film)), (128, 128)))
            (root / split / "labels" / f"{i}.txt").write_text(f"{i % len(NAMES)} 0.5 0.45 0.4 0.3\n")
    (root / "data.yaml").write_text(
        f"path: {root}\ntrain: train/images\nval: val/images\nnames: {json.dumps(dict(enumerate(NAMES)))}\n"
    )
    YOLO("yolov8n.yaml").train(
        data=str(root / "data.yaml"), epochs=1, imgsz=64, batch=2, workers=0, device="cpu", amp=False,
        plots=False, project=str(root / "runs"), name="t", exist_ok=True, pretrained=False, verbose=False,
    )  # fmt: skip
    best = root / "runs" / "t" / "weights" / "best.pt"
    YOLO(str(best)).export(format="onnx", imgsz=64, simplify=False, dynamic=False)
    assert best.with_suffix(".onnx").is_file()
    return best


def ultralytics_boxes(best: Path, x: torch.Tensor) -> np.ndarray:
    """What ultralytics itself finds on a prepared input: its model, its NMS; classes as finding ids."""
    from ultralytics import YOLO
    from ultralytics.utils.nms import non_max_suppression

    model = YOLO(str(best)).model.float().eval()
    with torch.inference_mode():
        raw = model(x)[0]
    d = non_max_suppression(raw, conf_thres=0.001, iou_thres=0.7, max_det=300, nc=len(NAMES))[0].numpy()
    found = np.asarray(map_classes(NAMES))
    d[:, 5] = found[d[:, 5].astype(int)]
    return d


def test_ultralytics_checkpoint_imports_with_its_classes_mapped_and_finds_the_same_boxes(yolo_run, tmp_path):
    r = dicom_node("import-model", str(yolo_run), "-o", str(tmp_path / "det.pt"), "--version", "1.2.0")
    assert r.returncode == 0, r.stderr
    assert "can run code" in r.stdout  # the operator is told what unpickling means
    assert "reports: Aortic enlargement, Cardiomegaly, Lung Opacity, Nodule/Mass, Pleural effusion" in r.stdout
    det = Detector.load(tmp_path / "det.pt")
    meta = det.loaded.metadata
    assert meta.version == "1.2.0" and meta.architecture == "yolov8n" and meta.input_size == 64
    assert [FINDING_CLASSES[i] for i in meta.extra["output_classes"]] == [
        "Cardiomegaly", "Pleural effusion", "Aortic enlargement", "Nodule/Mass", "Lung Opacity"
    ]  # fmt: skip
    # the same input through ultralytics and through the node: the same boxes, scores and findings
    x, _ = to_model_input(apply_clahe(xray(), det.preprocess), det.preprocess)
    ours = det.predict(x, conf=0.001)[0]
    theirs = ultralytics_boxes(yolo_run, torch.from_numpy(x[None]))
    assert len(ours) == len(theirs) > 0
    np.testing.assert_allclose(ours, theirs, atol=0.01)  # boxes in px, scores, finding ids
    # the node file loads without unpickling anything
    torch.load(tmp_path / "det.pt", weights_only=True)


def test_class_names_that_map_to_no_finding_are_refused_by_name(yolo_run, tmp_path):
    ckpt = torch.load(yolo_run, weights_only=False)
    ckpt["model"].names = {0: "Cardiomegaly", 1: "Effusion", 2: "Aortic enlargement", 3: "Mass", 4: "Lung Opacity"}
    nih = tmp_path / "nih-names.pt"
    torch.save(ckpt, nih)
    r = dicom_node("import-model", str(nih), "-o", str(tmp_path / "det.pt"))
    assert r.returncode == 1 and "'Effusion'" in r.stderr and "'Mass'" in r.stderr, r.stderr
    assert "--class-map" in r.stderr and not (tmp_path / "det.pt").exists()
    (tmp_path / "map.yaml").write_text("Effusion: Pleural effusion\nMass: null\n")
    r = dicom_node("import-model", str(nih), "-o", str(tmp_path / "det.pt"), "--class-map", str(tmp_path / "map.yaml"))
    assert r.returncode == 0, r.stderr
    assert "reports: Aortic enlargement, Cardiomegaly, Lung Opacity, Pleural effusion" in r.stdout
    with pytest.raises(ModelError, match="'Effusion'"):
        map_classes(["Effusion"])


def test_timm_classifiers_saved_the_notebook_ways_import_and_agree(tmp_path):
    import timm

    torch.manual_seed(0)
    davit = timm.create_model("davit_tiny", pretrained=False, num_classes=1).eval()
    torch.save(davit.state_dict(), tmp_path / "davit.pth")  # the research project's way
    dense = timm.create_model("densenet121", pretrained=False, num_classes=2).eval()
    wrapped = torch.nn.DataParallel(dense)
    torch.save({"epoch": 9, "state_dict": wrapped.state_dict(), "best_acc": 0.92}, tmp_path / "dense.ckpt")

    r = dicom_node(
        "import-model", str(tmp_path / "davit.pth"), "-o", str(tmp_path / "davit.pt"), "--arch", "davit_tiny"
    )
    assert r.returncode == 0, r.stderr
    r = dicom_node("import-model", str(tmp_path / "dense.ckpt"), "-o", str(tmp_path / "dense.pt"), "--arch",
                   "densenet121", "--input-size", "256")  # fmt: skip
    assert r.returncode == 1 and "--abnormal-index" in r.stderr  # a softmax: which output is abnormal?
    assert import_timm(tmp_path / "dense.ckpt", tmp_path / "dense.pt", arch="densenet121", input_size=256,
                       abnormal_index=1).exists()  # fmt: skip

    img = xray(1)
    for name, original, softmax in (("davit", davit, False), ("dense", dense, True)):
        clf = Classifier.load(tmp_path / f"{name}.pt")
        pre = clf.preprocess
        assert pre.channels == 3 and pre.resize == "stretch" and pre.mean == IMAGENET_MEAN and pre.std == IMAGENET_STD
        # the node's input is the notebook's: CLAHE, resize to S x S, grey to RGB, ImageNet normalisation
        clahe = apply_clahe(img, pre)
        rgb = np.repeat(cv2.resize(clahe, (pre.input_size,) * 2, interpolation=cv2.INTER_AREA)[None], 3, axis=0)
        notebook = (rgb - np.array(IMAGENET_MEAN)[:, None, None]) / np.array(IMAGENET_STD)[:, None, None]
        ours_x = to_model_input(clahe, pre)[0]
        np.testing.assert_allclose(ours_x, notebook, atol=1e-5)
        with torch.inference_mode():
            out = original(torch.from_numpy(notebook[None].astype(np.float32)))
        want = torch.softmax(out, 1)[0, 1].item() if softmax else torch.sigmoid(out)[0, 0].item()
        got = float(clf.predict_raw(ours_x[None])[0])
        assert abs(got - want) < 1e-5, (name, got, want)


def test_onnx_models_import_and_the_onnxruntime_backend_agrees_with_torch(yolo_run, tmp_path, models):
    import timm

    # an ONNX classifier (torch.onnx.export of a timm model) and ultralytics' own ONNX export of the detector
    torch.manual_seed(1)
    net = timm.create_model("resnet18", pretrained=False, num_classes=1).eval()
    torch.onnx.export(net, (torch.zeros(1, 3, 224, 224),), str(tmp_path / "clf.onnx"), input_names=["input"],
                      dynamic_axes={"input": {0: "n"}}, dynamo=False)  # fmt: skip
    for args in (
        ("import-model", str(tmp_path / "clf.onnx"), "--kind", "classifier", "-o", str(tmp_path / "clf.pt")),
        ("import-model", str(yolo_run.with_suffix(".onnx")), "--kind", "detector", "-o", str(tmp_path / "det.pt")),
    ):
        r = dicom_node(*args)
        assert r.returncode == 0, r.stderr
    clf, det = Classifier.load(tmp_path / "clf.pt"), Detector.load(tmp_path / "det.pt")
    assert clf.onnx and det.onnx and clf.preprocess.input_size == 224  # read from the graph
    x = to_model_input(apply_clahe(xray(), clf.preprocess), clf.preprocess)[0]
    with torch.inference_mode():
        want = torch.sigmoid(net(torch.from_numpy(x[None])))[0, 0].item()
    assert abs(float(clf.predict_raw(x[None])[0]) - want) < 1e-4
    xd = to_model_input(apply_clahe(xray(), det.preprocess), det.preprocess)[0]
    theirs = ultralytics_boxes(yolo_run, torch.from_numpy(xd[None]))
    ours = det.predict(xd, conf=0.001)[0]
    assert len(ours) == len(theirs) > 0
    np.testing.assert_allclose(ours, theirs, atol=0.01)

    # export-onnx beside model files (the node's own classifier, the imported detector); the onnxruntime backend
    # gives what torch gives
    own = tmp_path / "own"
    own.mkdir()
    (own / "classifier.pt").write_bytes(Path(models["classifier"]).read_bytes())
    import_ultralytics(yolo_run, own / "detector.pt")
    paths = (own / "classifier.pt", own / "detector.pt")
    for path in paths:
        r = dicom_node("export-onnx", str(path))
        assert r.returncode == 0 and path.with_suffix(".onnx").is_file(), r.stderr
    a = Pipeline.from_files(*paths)
    b = Pipeline.from_files(*paths, backend="onnxruntime")
    assert b.classifier.onnx and b.detector.onnx and not a.detector.onnx
    assert abs(a.run(xray(2)).p_abnormal - b.run(xray(2)).p_abnormal) < 1e-5
    xd = to_model_input(apply_clahe(xray(2), a.detector.preprocess), a.detector.preprocess)[0]
    da, db = a.detector.predict(xd, conf=0.001)[0], b.detector.predict(xd, conf=0.001)[0]
    assert len(da) == len(db) > 0
    np.testing.assert_allclose(da, db, atol=0.01)
    # a model file replaced after its export: the stale export is refused, naming the fix
    loaded = load_model_file(paths[1], "detector")
    loaded.metadata.version = "9.9.9"
    save_model_file(paths[1], loaded.metadata, loaded.state_dict, loaded.model_yaml)
    with pytest.raises(ModelError, match="export-onnx"):
        Detector.load(tmp_path / "own" / "detector.pt", backend="onnxruntime")


def test_an_int8_export_of_the_shipped_models_stays_close_to_torch_and_says_it_is_int8(tmp_path):
    """``export-onnx --int8``: calibrated on 16 real films (normal and abnormal), checked on abnormal films it
    never saw; the detector's output layers stay float32; the results name the int8 network, not its parent."""
    import onnx

    own = tmp_path / "own"
    own.mkdir()
    for name in ("classifier", "detector"):
        (own / f"{name}.pt").write_bytes((REPO / "models" / f"{name}.pt").read_bytes())
    normals = XRAYS.parent.parent / "normal" / "images"
    # calibration films: normal and abnormal, none of those checked below (xray(0..5))
    calibration = sorted(normals.glob("*.jpg"))[:8] + sorted(XRAYS.glob("*.jpg"))[20:28]
    r = dicom_node("export-onnx", str(own / "detector.pt"), "--int8")
    assert r.returncode == 2 and "--calibration-images" in r.stderr, r.stderr
    few = tmp_path / "few"
    few.mkdir()
    for f in sorted(normals.glob("*.jpg"))[:3]:
        (few / f.name).write_bytes(f.read_bytes())
    (few / "DICOMDIR").write_bytes(b"not an image")  # left out with a warning, not a crash
    r = dicom_node("export-onnx", str(own / "detector.pt"), "--int8", "--calibration-images", str(few))
    assert r.returncode != 0 and "3 analysable radiograph(s) of 4 file(s)" in r.stderr, r.stderr
    assert "DICOMDIR" in r.stderr and not (own / "detector.onnx").exists()
    for name, extra in (("classifier", ["--reduce-range"]), ("detector", [])):
        r = dicom_node(
            "export-onnx", str(own / f"{name}.pt"), "--int8", *extra, "--calibration-images", *map(str, calibration)
        )  # fmt: skip
        assert r.returncode == 0 and "int8" in r.stdout and "at the working size 512 px" in r.stdout, r.stderr
    meta = {p.key: p.value for p in onnx.load(str(own / "classifier.onnx")).metadata_props}
    assert meta["dicom_node_precision"] == "int8" and "7-bit" in meta["dicom_node_int8_calibration"]
    assert normals.name not in meta["dicom_node_int8_calibration"]  # no file names (they can identify patients)
    # the convolutions really are int8: their weights are stored as 8-bit integers
    graph = onnx.load(str(own / "detector.onnx"))
    int8_weights = [t for t in graph.graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 4]
    assert len(int8_weights) >= 50
    # ... except the head's output layers (box distributions, class logits) and DFL, whose ranges a film unlike the
    # calibration films would overflow: their inputs and weights are plain float32
    dequantized = {n.output[0] for n in graph.graph.node if n.op_type == "DequantizeLinear"}
    convs = [n for n in graph.graph.node if n.op_type == "Conv"]
    outputs = [n for n in convs if re.search(r"/cv[23]\.\d/cv[23]\.\d\.2/Conv$|/dfl/", n.name)]
    assert len(outputs) == 7  # cv2.0-2.2, cv3.0-3.2 (three scales each) and DFL
    assert all(n.input[0] not in dequantized and n.input[1] not in dequantized for n in outputs)
    assert sum(n.input[1] in dequantized for n in convs) == len(convs) - 7

    a = Pipeline.from_files(own / "classifier.pt", own / "detector.pt")
    b = Pipeline.from_files(own / "classifier.pt", own / "detector.pt", backend="onnxruntime")
    assert [m.version for m in b.models] == [f"{m.version}+int8" for m in a.models]
    assert all(mb.sha256 != ma.sha256 for ma, mb in zip(a.models, b.models))  # own Device UID, own calibration
    for n in range(4):  # abnormal films the calibration did not see
        img = xray(n)
        pa, pb = a.run(img), b.run(img)
        assert abs(pa.p_abnormal - pb.p_abnormal) < 0.03, (n, pa.p_abnormal, pb.p_abnormal)
        xd = to_model_input(apply_clahe(img, a.detector.preprocess), a.detector.preprocess)[0]
        da, db = a.detector.predict(xd, conf=0.1)[0], b.detector.predict(xd, conf=0.05)[0]
        for box in da[:3]:  # torch's strongest boxes: int8 finds each (same class, IoU >= 0.7, score +-0.15)
            same = db[db[:, 5] == box[5]]
            assert len(same), (n, box)
            ious = [_iou(box[:4], other[:4]) for other in same]
            k = int(np.argmax(ious))
            assert ious[k] >= 0.7 and abs(same[k, 4] - box[4]) < 0.15, (n, box, same[k], ious[k])

    # analyze names the int8 models in its result
    result = analyze_film(tmp_path, own / "classifier.pt", own / "detector.pt", 5, backend="onnxruntime")
    assert all(m["version"].endswith("+int8") for m in result["models"]), result["models"]


def _iou(a, b) -> float:
    x1, y1, x2, y2 = max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x2 - x1) * max(0.0, y2 - y1)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


class Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_pickled_checkpoint_is_never_loaded_by_the_node(tmp_path, models):
    marker = tmp_path / "pwned"
    torch.save({"model": Evil(marker), "state_dict": {}}, tmp_path / "best.pt")
    (tmp_path / "config.yaml").write_text(
        f"inference:\n  models:\n    classifier: {models['classifier']}\n    detector: {tmp_path / 'best.pt'}\n"
        f"storage:\n  root: {tmp_path / 'var'}\n"
    )
    r = dicom_node("check-config", "--config", str(tmp_path / "config.yaml"))
    assert r.returncode == 2 and "pickled Python objects" in r.stderr, r.stderr
    assert not marker.exists()  # nothing in the file ran
    film = sorted(XRAYS.glob("*.jpg"))[0]
    r = dicom_node("analyze", "--config", str(tmp_path / "config.yaml"), str(film), "-o", str(tmp_path / "out"))
    assert r.returncode == 1 and "pickled" in r.stderr and not marker.exists()


@pytest.fixture(scope="module")
def research_pair(tmp_path_factory) -> dict[str, str]:
    """The research project's kind of models, imported: a DaViT classifier (state_dict, 3 channels, ImageNet
    normalisation, 224 px) and a YOLOv8x detector checkpoint at 640 px as ultralytics saves it. Random weights:
    what is checked is that the node runs them, not what they find."""
    import timm
    import ultralytics
    from ultralytics.nn.tasks import DetectionModel

    tmp = tmp_path_factory.mktemp("research")
    torch.manual_seed(2)
    torch.save(timm.create_model("davit_tiny", pretrained=False, num_classes=2).state_dict(), tmp / "davit.pth")
    yolo = DetectionModel("yolov8x.yaml", nc=14, verbose=False)
    yolo.names = dict(enumerate(FINDING_CLASSES))  # VinBigData's class_name spellings
    ckpt = {
        "epoch": -1,
        "best_fitness": None,
        "model": copy.deepcopy(yolo).half(),
        "ema": None,
        "updates": 0,
        "optimizer": None,
        "train_args": {"task": "detect", "imgsz": 640},
        "version": ultralytics.__version__,
    }  # what ultralytics' strip_optimizer leaves in best.pt
    torch.save(ckpt, tmp / "best.pt")
    assert import_timm(tmp / "davit.pth", tmp / "classifier.pt", arch="davit_tiny", abnormal_index=1).exists()
    assert import_ultralytics(tmp / "best.pt", tmp / "detector.pt").exists()
    return {"classifier": str(tmp / "classifier.pt"), "detector": str(tmp / "detector.pt")}


def test_analyze_and_serve_run_an_imported_davit_and_yolov8x(research_pair, node_factory, tmp_path):
    result = analyze_film(tmp_path, research_pair["classifier"], research_pair["detector"], 3)
    assert {m["architecture"] for m in result["models"]} == {"davit_tiny", "yolov8x"}
    assert 0 <= result["p_abnormal"] <= 1

    node = node_factory(workers={"count": 1}, inference={"models": research_pair}, studies={"stable_after_s": 0.5})
    make_cxr(tmp_path / "a.dcm", rows=512, cols=512)
    assert node.storescu(tmp_path / "a.dcm").returncode == 0
    wait_for(lambda: node.status()["jobs"]["done"] == 1, 300, interval=1, what="the study analysed")
    (row,) = node.rows("SELECT models FROM jobs")
    assert "davit_tiny" in row["models"] and "yolov8x" in row["models"]
