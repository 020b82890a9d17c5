"""vdmpp-losses: every diffusion objective as a weighted ELBO over log-SNR (VDM++), and VDM's bound.

* :mod:`~vdmpp.losses.weightings`: w(λ) for each row of VDM++ Table 1 plus VDM++'s own.
* :mod:`~vdmpp.losses.parameterizations`: eps / x / v / score / edm / flow conversions.
* :class:`WeightedLoss`: the estimator ½·w(λ)/p(λ)·‖ε − ε̂‖² of VDM++ eq. 7.
* :mod:`~vdmpp.losses.vlb`: VDM's prior, reconstruction and diffusion terms; :func:`bits_per_dim`
  (also for a timestep-conditioned model on a DDPM ᾱ table: :func:`bits_per_dim_discrete`).
* :mod:`~vdmpp.losses.uncertainty`: EDM2's learned uncertainty weighting (eq. 21),
  :class:`LogVarianceMLP` u(λ) and :func:`uncertainty_weighted` ℓ·e^{−u} + u.
"""

from importlib.metadata import PackageNotFoundError, version

from . import parameterizations, uncertainty, vlb, weightings
from .uncertainty import LogVarianceMLP, uncertainty_weighted
from .vlb import (
    DiscreteTimeModel,
    TimestepModel,
    VLBTerms,
    bits_per_dim,
    bits_per_dim_discrete,
)
from .weighted import LossOutput, WeightedLoss
from .weightings import Weighting

try:
    __version__ = version("vdmpp-losses")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+unknown"

__all__ = [
    "DiscreteTimeModel",
    "LogVarianceMLP",
    "LossOutput",
    "TimestepModel",
    "VLBTerms",
    "WeightedLoss",
    "Weighting",
    "bits_per_dim",
    "bits_per_dim_discrete",
    "parameterizations",
    "uncertainty",
    "uncertainty_weighted",
    "vlb",
    "weightings",
]
