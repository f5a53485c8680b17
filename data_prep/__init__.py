"""From raw T1-weighted MRI (IXI, BIDS, CSV) or the simulated cohort to NIfTI volumes and MONAI datalists."""
