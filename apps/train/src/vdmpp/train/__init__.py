"""vdmpp-train: one TOML config → one run directory (checkpoints, metrics, samples, export)."""

from importlib.metadata import PackageNotFoundError, version

from .config import Config, ConfigError, load
from .export import ExportError, load_exported

try:
    __version__ = version("vdmpp-train")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+unknown"

__all__ = ["Config", "ConfigError", "ExportError", "__version__", "load", "load_exported"]
