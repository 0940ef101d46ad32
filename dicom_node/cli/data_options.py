"""The options every training command shares: which labelled images (``--layout``, ``--data``, ``--csv``, ...,
read into a :class:`~inference.training.commands.DataSelection`), how a VinBigData DICOM folder is exported
(:class:`DicomExport`), ``--backend``; :func:`from_namespace`, which fills an option object from the parsed
command line; and the DICOM side's image reader the commands are given.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import numpy as np

from dicom_node.cli.exit_codes import UsageError
from dicom_node.errors import DicomNodeError
from inference.errors import DatasetError
from inference.training.commands import DEFAULT_DATA, LAYOUTS, DataSelection

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

    Options = TypeVar("Options", bound=DataclassInstance)

Settings = TypeVar("Settings")


def from_namespace(cls: type[Options], args: argparse.Namespace, **given: Any) -> Options:
    """The dataclass ``cls`` with each field set from the option of the same name (``given`` ones as given; a
    field the command has no option for keeps its default)."""
    names = [f.name for f in dataclasses.fields(cls) if f.name not in given and hasattr(args, f.name)]
    return cls(**{name: getattr(args, name) for name in names}, **given)


def add_data_arguments(p: argparse.ArgumentParser, *, export_raw_default: bool = False) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--layout", choices=LAYOUTS, default="nih")
    g.add_argument(
        "--data",
        default=DEFAULT_DATA,
        help="nih: folder holding nih-bbox/ and nih-normal/; nih-matched: folder holding nih-matched/",
    )
    g.add_argument("--csv", help="vinbigdata: train.csv; folder: labels.csv with image,label[,view,batch]")
    g.add_argument(
        "--images", help="vinbigdata: folder of <image_id>.png|.jpg (or .dicom/.dcm to export); folder: the images"
    )
    g.add_argument("--annotations", default="R9", help="vinbigdata: a reader id (R9) or 'wbf' (all readers fused)")
    g.add_argument("--min-votes", type=int, default=1, help="vinbigdata wbf: readers that must agree on a box")
    g.add_argument("--seed", type=int, default=0, help="split and training seed")
    g.add_argument("--split", default="0.7,0.15,0.15", help="train,val,test fractions (by patient)")
    g.add_argument("--export-dir", help="vinbigdata DICOM export folder (default: next to --csv)")
    g.add_argument("--export-max-size", type=int, default=1024, help="vinbigdata export: longer side limit")
    g.add_argument(
        "--export-raw",
        action="store_true",
        default=export_raw_default,
        help="vinbigdata export without CLAHE (training applies it; needed for evaluate)",
    )


def add_backend_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--backend",
        choices=("torch", "onnxruntime"),
        default="torch",
        help="as inference.models.backend; onnxruntime: each model's ONNX export beside it (dicom-node export-onnx, "
        "e.g. an int8 one: measure it with the backend the node will run)",
    )


@dataclass(frozen=True)
class DicomExport:
    """How a VinBigData DICOM ``--images`` folder is exported to PNG before a command reads it."""

    export_dir: str | None = None  # default: next to --csv
    max_size: int | None = 1024  # longer side limit; None: full size
    raw: bool = False  # without CLAHE
    workers: int = 1  # processes (a training command's data loader workers)


def data_selection(args: argparse.Namespace) -> tuple[DataSelection, DicomExport]:
    """The data options of a parsed command line; options that do not go together are a :class:`UsageError`."""
    data = from_namespace(DataSelection, args)
    problem = data.usage_problem()
    if problem:
        raise UsageError(problem)
    workers = max(1, int(getattr(args, "workers", 0) or 1))  # training commands: the data loader's
    return data, DicomExport(args.export_dir, args.export_max_size or None, args.export_raw, workers)


def exported(data: DataSelection, export: DicomExport) -> DataSelection:
    """``data``, pointing at the PNG export of its VinBigData DICOM folder (exported now unless done before)."""
    if data.layout != "vinbigdata" or not data.csv or not data.images:
        return data
    from dicom_node.training.vinbigdata_export import export_for_training

    csv, images = export_for_training(
        data.csv,
        data.images,
        export_dir=export.export_dir,
        max_size=export.max_size,
        raw=export.raw,
        workers=export.workers,
    )
    return dataclasses.replace(data, csv=csv, images=images)


@dataclass(frozen=True)
class DataCommandOptions(Generic[Settings]):
    """The options of a command that works on a data selection: the data, how its DICOM is exported, and the
    command's own settings (e.g. :class:`~inference.training.commands.CalibrationSettings`)."""

    data: DataSelection
    export: DicomExport
    settings: Settings

    @classmethod
    def from_args(cls, args: argparse.Namespace, settings: Settings) -> DataCommandOptions[Settings]:
        return cls(*data_selection(args), settings)

    def exported_data(self) -> DataSelection:
        """The data selection, after the DICOM export it needs (if any)."""
        return exported(self.data, self.export)


def read_radiograph(path: Path) -> tuple[np.ndarray, str | None]:
    """An image file (DICOM, PNG or JPEG) -> (float32 image in [0, 1], its ViewPosition when the header says);
    a file that cannot be read as a greyscale radiograph raises DatasetError with the reason."""
    from dicom_node.work.offline import read_image

    try:
        img, _, view = read_image(path)
    except (DicomNodeError, ValueError, OSError) as exc:
        raise DatasetError(str(exc)) from exc
    return img, view
