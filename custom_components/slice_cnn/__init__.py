"""The slice_cnn_brainage bundle's own components: its networks, evaluation handlers, CPU autocast
inferer, weight averaging, AD-detection metrics and the baselines its figures are read against."""
