"""Loads the compiled extension `bridge_ops._C` and keeps the reason when it cannot.

`import torch` must come first: `_C` links against libc10/libtorch, which torch's import makes loadable.
Importing bridge_ops never fails because of `_C`; without it every op runs its reference implementation and
`python -m bridge_ops.info` shows why.
"""

import warnings

import torch  # noqa: F401  (must be imported before _C)

try:
    from bridge_ops import _C  # type: ignore[attr-defined]

    LOAD_ERROR = None
except (ImportError, OSError) as error:  # not built, or built against another torch
    _C = None
    LOAD_ERROR = f"{type(error).__name__}: {error}"
    warnings.warn(
        f"bridge_ops: the compiled extension could not be loaded ({LOAD_ERROR}); using the slower PyTorch "
        "reference implementation. Build it with `pip install --no-build-isolation -e .` and see "
        "`python -m bridge_ops.info`.",
        RuntimeWarning,
        stacklevel=2,
    )


def build_info() -> dict:
    """How the loaded extension was built (empty without it)."""
    return dict(_C.build_info()) if _C is not None else {}
