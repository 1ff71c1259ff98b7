"""Loads the compiled extension `mingpt._C` if it was built; `import mingpt` never needs it.

An install whose build of the extension failed (setup.py) leaves the reason in _C_unbuilt.txt beside
this file; UNAVAILABLE_REASON then quotes it, so every command that falls back to the reference
path can say why.
"""
import os

import torch  # noqa: F401  (mingpt._C links against torch's libraries: load them first)

REBUILD_HINT = "build it with `pip install --no-build-isolation -e .` from the project root"
UNBUILT_NOTE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "_C_unbuilt.txt")


def unavailable_reason(error: ImportError) -> str:
    if os.path.isfile(UNBUILT_NOTE):
        with open(UNBUILT_NOTE, encoding="utf-8") as f:
            return (f"mingpt._C was not built at install ({f.read().strip()}); the reference ops serve "
                    f"instead; {REBUILD_HINT} once that is fixed")
    return f"mingpt._C could not be loaded ({error}); {REBUILD_HINT}"


try:
    from .. import _C
    UNAVAILABLE_REASON = None
except ImportError as e:
    _C = None
    UNAVAILABLE_REASON = unavailable_reason(e)


def require_extension():
    if _C is None:
        raise RuntimeError(UNAVAILABLE_REASON)
    return _C
