"""Find a user's `Garrison` application from `module:attribute`."""

from __future__ import annotations

import importlib
import os
import sys

from garrison.engine import Garrison
from garrison.errors import ConfigurationError

__all__ = ["load_app"]


def load_app(spec: str) -> Garrison:
    """Import `module:attribute` (the working directory is importable) and return the app.

    Raises:
        ConfigurationError: naming what is missing and the expected form.
    """
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ConfigurationError(
            f"--app {spec!r}: expected 'module:attribute', e.g. 'shop.jobs:app'"
        )
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise ConfigurationError(
            f"--app {spec!r}: cannot import {module_name!r} ({exc}); run from the project "
            "folder or install the package"
        ) from exc
    except Exception as exc:  # the module itself failed: a setup error, not a divergence
        raise ConfigurationError(
            f"--app {spec!r}: importing {module_name!r} raised {type(exc).__name__}: {exc}; "
            "fix the module (run `python -c 'import " + module_name + "'` to see the "
            "traceback)"
        ) from exc
    if not hasattr(module, attribute):
        raise ConfigurationError(
            f"--app {spec!r}: module {module_name!r} has no attribute {attribute!r}; name "
            "the variable holding your Garrison app"
        )
    app = getattr(module, attribute)
    if not isinstance(app, Garrison):
        raise ConfigurationError(
            f"--app {spec!r}: {module_name}.{attribute} is {type(app).__name__}, not a Garrison app"
        )
    return app
