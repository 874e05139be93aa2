"""The names of the precisions a run may compute in, and their check.

Apart from bench.core.precision (which holds what they mean) because the command line and the sweep
settings need them, and ``bench report``, which imports both, must start without importing torch.
"""

from __future__ import annotations

from bench.core.errors import ConfigError

PRECISIONS = ("fp32", "bf16", "fp16")
DEFAULT_PRECISION = "fp32"


def check_name(name: str) -> str:
    """``name`` if it is a precision, else a ConfigError naming the choices."""
    if name not in PRECISIONS:
        raise ConfigError(f"--precision {name!r}: choose one of {', '.join(PRECISIONS)}")
    return name
