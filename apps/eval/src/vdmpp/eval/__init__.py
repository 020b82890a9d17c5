"""vdmpp-eval: sample a vdmpp model, score it (FID/IS/KID/PR, a digits Fréchet distance and
class accuracy), bound its likelihood in bits/dim (VDM), and plot schedules and weightings."""

from importlib.metadata import PackageNotFoundError, version

from .model import EvalError, load_model

try:
    __version__ = version("vdmpp-eval")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+unknown"

__all__ = ["EvalError", "__version__", "load_model"]
