"""Networks of both bundles."""
