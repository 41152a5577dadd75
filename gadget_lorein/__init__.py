"""gadget_lorein: a Gadgetron node for LoREIN multi-parametric quantitative MRI.

Array conventions used across the package (physics and fit know nothing of ISMRMRD):
- volumes are (nz, ny, nx) = (partition/kz, phase/ky, readout/kx);
- k-space is (coils, frames, nz, ny, nx); sampling masks are (frames, nz, ny) booleans;
- FFTs are centred and orthonormal (see ``gadget_lorein.fft``): index n//2 is the k-space centre;
- T1 and T2 are in milliseconds, B1 is a flip-angle scale (1 = nominal), PD is relative.

CPU threads: importing the package sets ``OMP_WAIT_POLICY=PASSIVE`` unless it is already set, so
that torch's OpenMP (libgomp, which reads it once, when torch loads) lets idle threads sleep instead
of spin. The node shares its cores with Gadgetron and the chain's other gadgets; with spinning
threads a descheduled one stalls every parallel operation (benchmarks/RESULTS.md, "CPU threads").
It takes effect only where the package is imported before torch, as in the gadget's process
(``python -m gadgetron PORT gadget_lorein.node.gadget ...``) and the ``lorein`` command.
"""

import os as _os

_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
