"""vdmpp-samplers: EDM's Heun and stochastic samplers, DDPM ancestral, DDIM, Euler, and CFG.

Every sampler drives a denoiser D(x, sigma) -> x0_hat in EDM's units (EDM); ``as_denoiser``
adapts a λ-conditioned VP/VE model to it and ``from_discrete`` a timestep-conditioned
DDPM/diffusers one. Sampling from a list of seeds with :class:`PerSampleGenerator` makes image k
depend on seed k only.
"""

from importlib.metadata import PackageNotFoundError, version

from ._step import churn, heun_step
from .adaptive import AdaptiveInfo, dpm_adaptive
from .denoiser import PARAMETERIZATIONS, Denoiser, Guided, ModelDenoiser, as_denoiser, guided
from .discrete import (
    DISCRETE_PARAMETERIZATIONS,
    DiscreteDenoiser,
    discrete_sigmas,
    from_discrete,
    sigmas_from_discrete,
)
from .fast import (
    ancestral_step,
    dpm_2,
    dpm_2_ancestral,
    dpmpp_2m,
    dpmpp_2m_sde,
    dpmpp_2s_ancestral,
    dpmpp_3m_sde,
    dpmpp_sde,
    euler_ancestral,
    lms,
    lms_coefficients,
)
from .generators import PerSampleGenerator, noise_for_seeds, randn_like
from .grids import karras_sigmas, sigmas_from_schedule
from .likelihood import LogLikelihood, log_likelihood
from .registry import SAMPLERS, SamplerOption, SamplerSpec, check_options
from .samplers import SampleInfo, ddim, ddpm, edm_stochastic, euler, heun
from .unipc import unipc, unipc_coefficients

try:
    __version__ = version("vdmpp-samplers")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+unknown"

__all__ = [
    "DISCRETE_PARAMETERIZATIONS",
    "PARAMETERIZATIONS",
    "SAMPLERS",
    "AdaptiveInfo",
    "Denoiser",
    "DiscreteDenoiser",
    "Guided",
    "LogLikelihood",
    "ModelDenoiser",
    "PerSampleGenerator",
    "SampleInfo",
    "SamplerOption",
    "SamplerSpec",
    "__version__",
    "ancestral_step",
    "as_denoiser",
    "check_options",
    "churn",
    "ddim",
    "ddpm",
    "discrete_sigmas",
    "dpm_2",
    "dpm_2_ancestral",
    "dpm_adaptive",
    "dpmpp_2m",
    "dpmpp_2m_sde",
    "dpmpp_2s_ancestral",
    "dpmpp_3m_sde",
    "dpmpp_sde",
    "edm_stochastic",
    "euler",
    "euler_ancestral",
    "from_discrete",
    "guided",
    "heun",
    "heun_step",
    "karras_sigmas",
    "lms",
    "lms_coefficients",
    "log_likelihood",
    "noise_for_seeds",
    "randn_like",
    "sigmas_from_discrete",
    "sigmas_from_schedule",
    "unipc",
    "unipc_coefficients",
]
