"""The training driver: ``kdkernels-train`` / ``python -m kdkernels.train`` (see cli.py)."""
