"""vdmpp-samplers: EDM's Heun and stochastic samplers, DDPM ancestral, DDIM, Euler, and CFG.

Every sampler drives a denoiser D(x, sigma) -> x0_hat in EDM's units (EDM); ``as_denoiser``
adapts a λ-conditioned VP/VE model to it and ``from_discrete`` a timestep-conditioned
DDPM/diffusers one. Sampling from a list of seeds with :class:`PerSampleGenerator` makes image k
depend on seed k only.
"""

from importlib.metadata import PackageNotFoundError, version

from ._step import churn, heun_step
from .denoiser import PARAMETERIZATIONS, Denoiser, Guided, ModelDenoiser, as_denoiser, guided
from .discrete import (
    DISCRETE_PARAMETERIZATIONS,
    DiscreteDenoiser,
    discrete_sigmas,
    from_discrete,
    sigmas_from_discrete,
)
from .generators import PerSampleGenerator, noise_for_seeds, randn_like
from .grids import karras_sigmas, sigmas_from_schedule
from .samplers import SampleInfo, ddim, ddpm, edm_stochastic, euler, heun

try:
    __version__ = version("vdmpp-samplers")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+unknown"

__all__ = [
    "DISCRETE_PARAMETERIZATIONS",
    "PARAMETERIZATIONS",
    "Denoiser",
    "DiscreteDenoiser",
    "Guided",
    "ModelDenoiser",
    "PerSampleGenerator",
    "SampleInfo",
    "__version__",
    "as_denoiser",
    "churn",
    "ddim",
    "ddpm",
    "discrete_sigmas",
    "edm_stochastic",
    "euler",
    "from_discrete",
    "guided",
    "heun",
    "heun_step",
    "karras_sigmas",
    "noise_for_seeds",
    "randn_like",
    "sigmas_from_discrete",
    "sigmas_from_schedule",
]
