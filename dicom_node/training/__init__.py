"""Training-only glue on the DICOM side: the VinBigData DICOM export (the training commands themselves are in
:mod:`dicom_node.cli`: :mod:`~dicom_node.cli.training`, :mod:`~dicom_node.cli.evaluation`, ...).

The running node never imports this package (an import contract in ``pyproject.toml`` checks it).
"""
