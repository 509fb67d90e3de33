"""Loading a user's function named on the command line as `package.module.function` or `file.py:function`."""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any


def load_function(path: str, flag: str) -> Callable[..., Any]:
    """Resolve `path` to a callable; a ValueError names `flag`, the path and what to fix."""
    module_name, separator, function_name = path.rpartition(":") if ":" in path else path.rpartition(".")
    if not separator or not module_name or not function_name:
        raise ValueError(f"{flag}={path!r} must look like 'package.module.function' or 'path/to/file.py:function'")
    try:
        module = _import_file(Path(module_name)) if separator == ":" else importlib.import_module(module_name)
    except Exception as error:
        raise ValueError(f"{flag}={path!r}: cannot import {module_name!r} ({type(error).__name__}: {error}); "
                         "check the path and that it is importable") from error
    function = getattr(module, function_name, None)
    if not callable(function):
        raise ValueError(f"{flag}={path!r}: {module_name!r} has no callable {function_name!r}")
    return function


def _import_file(file_path: Path) -> Any:
    if file_path.suffix != ".py" or not file_path.is_file():
        raise FileNotFoundError(f"no Python file at {file_path}")
    spec = importlib.util.spec_from_file_location(f"vime_user_{file_path.stem}", file_path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
