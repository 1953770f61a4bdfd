"""fineprune: remove backdoors from untrusted Keras models, and report what it cost.

    import fineprune
    report = fineprune.sanitize("model.keras", "clean.npz", "result/",
                                fineprune.SanitizeOptions(rescale=1 / 255))

`Client` talks to the REST service instead. Names are imported on first use, so that
`import fineprune` stays light and TensorFlow loads only when the engine runs.
"""

from __future__ import annotations

from importlib import import_module, metadata
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fineprune.client import Client
    from fineprune.pipeline import sanitize
    from schemas.options import SanitizeOptions
    from schemas.report import SanitizeReport

__all__ = ["Client", "SanitizeOptions", "SanitizeReport", "__version__", "sanitize"]

try:
    __version__ = metadata.version("fineprune")
except metadata.PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

_WHERE = {
    "sanitize": "fineprune.pipeline",
    "Client": "fineprune.client",
    "SanitizeOptions": "schemas.options",
    "SanitizeReport": "schemas.report",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'fineprune' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
