"""Fine-tuning methods over one base, looked up by name: `get("sharpness-aware")`."""

from fineprune.tune.methods import feature_shift, plain, sharpness, unlearning  # noqa: F401
from fineprune.tune.methods.base import Method, Setup, get

__all__ = ["Method", "Setup", "get"]
