"""vdmpp-schedules: noise schedules in log-SNR λ (VDM++ Table 4, EDM, VDM) and the λ↔σ↔α maps."""

from importlib.metadata import PackageNotFoundError, version

from .adaptive import Adaptive
from .base import NoiseSchedule, TruncatedSchedule, check_logsnr_range, check_unit_interval
from .fixed import Cosine, EDMSampling, EDMTraining, FlowOT, LinearLogSNR, LinearVP
from .learned import Learned
from .process import (
    NETWORK_HEADS,
    PARAMETERIZATIONS,
    PROCESSES,
    edm_coefficients_logsnr,
    logsnr_from_alpha_sigma,
    logsnr_from_sigma,
    sigma_from_logsnr,
    ve,
    vp,
    vp_transition,
)
from .time import low_discrepancy, uniform

try:
    __version__ = version("vdmpp-schedules")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+unknown"

__all__ = [
    "NETWORK_HEADS",
    "PARAMETERIZATIONS",
    "PROCESSES",
    "Adaptive",
    "Cosine",
    "EDMSampling",
    "EDMTraining",
    "FlowOT",
    "Learned",
    "LinearLogSNR",
    "LinearVP",
    "NoiseSchedule",
    "TruncatedSchedule",
    "check_logsnr_range",
    "check_unit_interval",
    "edm_coefficients_logsnr",
    "logsnr_from_alpha_sigma",
    "logsnr_from_sigma",
    "low_discrepancy",
    "sigma_from_logsnr",
    "uniform",
    "ve",
    "vp",
    "vp_transition",
]
