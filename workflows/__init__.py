"""Workflows over the whole repository: the demo end to end and its report, and packaging each bundle as a
Model Zoo zip. CLI: ``python -m workflows``."""
