"""Sequence physics: protocols, differentiable signal models and the temporal subspace built from them (no ISMRMRD here)."""
