"""Loads the compiled extension `mingpt._C` if it was built; `import mingpt` never needs it."""
import torch  # noqa: F401  (mingpt._C links against torch's libraries: load them first)

REBUILD_HINT = "build it with `pip install --no-build-isolation -e .` from the project root"

try:
    from . import _C
    UNAVAILABLE_REASON = None
except ImportError as e:
    _C = None
    UNAVAILABLE_REASON = f"mingpt._C could not be loaded ({e}); {REBUILD_HINT}"


def require_extension():
    if _C is None:
        raise RuntimeError(UNAVAILABLE_REASON)
    return _C
