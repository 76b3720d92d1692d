"""vbseg: probabilistic tumour contouring with Bayesian spatial models fitted by variational
inference in JAX. ``vbseg.segment(...)`` is the Python entry point; ``vbseg`` the CLI."""

from vbseg.errors import InputError, OutputError, VbsegError
from vbseg.image import Volume
from vbseg.phantoms import Phantom, PhantomSpec, make_phantom
from vbseg.pipeline import segment
from vbseg.posterior import Posterior
from vbseg.volume import load_mask, load_volume

__version__ = "0.1.0"

__all__ = [
    "InputError",
    "OutputError",
    "Phantom",
    "PhantomSpec",
    "Posterior",
    "VbsegError",
    "Volume",
    "load_mask",
    "load_volume",
    "make_phantom",
    "segment",
]
