"""Reconstruction: buffered k-space + calibration + subspace -> fit -> maps (plain arrays and tensors; no ISMRMRD here)."""
