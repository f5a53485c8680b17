"""Networks of both bundles: the 3D age regressor (the GAN's task branch, and a downstream model the slice
bundle's train.json trains in the augmentation study) and the output layer of every network."""
