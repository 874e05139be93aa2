"""The foundation floor: what methods, datasets and the orchestration all stand on.

Errors, the dataset contract and its device-side view, metrics, model selection, run records,
backbones and their pretrained weights, and run-scoped artifacts. Nothing here imports ``methods``, ``datasets`` or the
orchestration modules of ``bench`` (trainer, runner, cli, sweep, report): tests/test_architecture.py
checks it.
"""
