"""Reporting, outside the retrieval core: the record of a run's evaluations (``metrics.json``), reading finished
runs back (run directories and W&B runs), plain-text and Markdown tables, and accuracy-against-size plots
(``python -m lightning_modules.cli compare``)."""
