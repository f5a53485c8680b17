"""What both bundles use: batch preparation and input listing, the inputs' out-of-distribution check,
handler building blocks, precise batch norm, checkpointing and resume, brain-age metrics and bias
correction, hardware detection, plots, and the networks both train."""
