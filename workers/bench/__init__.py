"""Benchmarks that run the service on Ray: ``service`` (configs A–D side by side, live streams, scaling) and
``reliability`` (fault scenarios). The Ray-free ones (``pruning``, ``decode``) live in ``pipeline/bench``."""
