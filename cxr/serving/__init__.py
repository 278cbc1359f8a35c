"""``cxr serve``: a trained model over HTTP (FastAPI on uvicorn, the optional ``[serve]`` extra).

This package's ``__init__`` imports nothing from FastAPI, so ``cxr`` works without the extra;
:func:`require_serve_extra` names the install command when it is missing.
"""

from __future__ import annotations

import importlib.util

from cxr.errors import CxrError

# import name → distribution, for the message
SERVE_MODULES = {"fastapi": "fastapi", "uvicorn": "uvicorn", "python_multipart": "python-multipart"}
INSTALL_HINT = 'pip install -e ".[serve]"'


def require_serve_extra() -> None:
    """Check that the ``[serve]`` extra is installed.

    Raises:
        CxrError: one line naming the missing packages and the install command.
    """
    missing = [dist for module, dist in SERVE_MODULES.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise CxrError(f"cxr serve needs {', '.join(missing)}: install with {INSTALL_HINT}")
