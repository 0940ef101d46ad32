"""Training and evaluation: dataset readers, the classifier and detector trainers, metrics, ``evaluate``.

Offline only: the inference runtime (preprocess, models, fusion, pipeline) never imports this package.
"""
