"""gadget_lorein: a Gadgetron node for LoREIN multi-parametric quantitative MRI.

Array conventions used across the package (physics and fit know nothing of ISMRMRD):
- volumes are (nz, ny, nx) = (partition/kz, phase/ky, readout/kx);
- k-space is (coils, frames, nz, ny, nx); sampling masks are (frames, nz, ny) booleans;
- FFTs are centred and orthonormal (see ``gadget_lorein.fft``): index n//2 is the k-space centre;
- T1 and T2 are in milliseconds, B1 is a flip-angle scale (1 = nominal), PD is relative.
"""

__version__ = "0.1.0"
