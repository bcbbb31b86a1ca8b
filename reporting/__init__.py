"""Reporting, outside the retrieval core: the record of a run's evaluations (``metrics.json``), reading finished
runs and sweeps back (run directories, W&B runs, sweep directories), plain-text and Markdown tables, and the
comparisons of ``python -m lightning_modules.cli compare``: methods per dataset (metrics, bytes per image, query
time, accuracy against bytes) and accuracy against embedding size."""
