"""Python pieces the bundles' configs point to: networks, the task-guided loss and trainer, handlers."""
