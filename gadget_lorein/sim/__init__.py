"""Simulation: the head phantom, sampling masks and simulated multi-coil acquisitions with ground truth."""
