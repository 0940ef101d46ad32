"""Training/evaluation datasets as plain :class:`Sample` lists (no DICOM here).

- :mod:`inference.training.data.nih` reads the NIH sets in ``../shared/datasets`` (nih-bbox + nih-normal).
- :mod:`inference.training.data.vinbigdata` reads the VinBigData layout (train.csv + exported PNG/JPEG images;
  DICOM files are exported by ``dicom_node.training.vinbigdata_export`` first).
- :mod:`inference.training.data.split` splits by patient (seeded, stratified by label and view).
- :mod:`inference.training.data.images` loads a sample's pixels as the pipeline sees them.
"""

from __future__ import annotations

from inference.training.data.sample import Sample

__all__ = ["Sample"]
