"""The 2D-slice set network: slice encoders, permutation-invariant slice aggregators, and the network."""
