"""``python -m dicom_node``: the ``dicom-node`` command (:func:`dicom_node.cli.main`)."""

from __future__ import annotations

import sys

from dicom_node.cli import main

if __name__ == "__main__":  # guarded: worker processes are spawned and re-import the main module
    sys.exit(main())
