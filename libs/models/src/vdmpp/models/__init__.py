"""vdmpp-models: λ-conditioned diffusion networks (ADM U-Net, U-ViT) and EDM preconditioning.

Every network and wrapper is called as `model(z, logsnr, class_labels=None)`: z in the units
of the process it was built for (VP by default), logsnr of shape [batch].
"""

from importlib.metadata import PackageNotFoundError, version

from .configs import CONFIGS, PARAM_COUNTS, build, config, param_count
from .embeddings import (
    LogSNREmbedding,
    c_noise_from_logsnr,
    fourier_channels,
    fourier_features,
    sinusoidal_embedding,
)
from .precond import (
    PARAMETERIZATIONS,
    PROCESSES,
    Preconditioned,
    edm_coefficients,
    edm_coefficients_logsnr,
)
from .unet import UNet
from .uvit import UViT

try:
    __version__ = version("vdmpp-models")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+unknown"

__all__ = [
    "CONFIGS",
    "PARAMETERIZATIONS",
    "PARAM_COUNTS",
    "PROCESSES",
    "LogSNREmbedding",
    "Preconditioned",
    "UNet",
    "UViT",
    "build",
    "c_noise_from_logsnr",
    "config",
    "edm_coefficients",
    "edm_coefficients_logsnr",
    "fourier_channels",
    "fourier_features",
    "param_count",
    "sinusoidal_embedding",
]
