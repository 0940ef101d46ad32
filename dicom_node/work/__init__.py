"""Analysis work: worker processes, the analyser that turns a job into result objects, offline analysis.

Importing :mod:`dicom_node.work.processes` does not import torch; only the worker processes load the models.
"""
