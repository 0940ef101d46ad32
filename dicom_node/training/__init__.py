"""Training-only glue on the DICOM side (VinBigData export, the ``train``/``evaluate`` commands).

The running node never imports this package (an import contract in ``pyproject.toml`` checks it).
"""
