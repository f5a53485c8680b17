"""The runtime core both bundles and data_prep build on: the canonical grid, volume and datalist I/O, input
checks, option parsing. Packaging vendors it into every bundle zip beside custom_components."""
