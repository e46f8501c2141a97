"""pdmoe's models join transformers when transformers loads the machinery that looks them up.

``pdmoe.config`` registers ``MoEConfig`` with ``AutoConfig``, ``pdmoe.modeling`` registers
``MoEForCausalLM`` with ``AutoModelForCausalLM`` and ``pdmoe.kernels`` the experts implementation
``"pdmoe"``, each when imported. Importing them up front would cost every ``pdmoe`` command the
start-up and memory of transformers' models; instead ``import pdmoe`` arranges that each is
imported right after the transformers module that needs it (the Auto classes, the MoE
integration), or at once when that module is already loaded. So ``import pdmoe`` followed by
``AutoModelForCausalLM.from_pretrained(a_pdmoe_checkpoint)`` works, and a process that never
touches transformers' models never loads them.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from collections.abc import Callable
from functools import partial
from types import ModuleType
from typing import Any

# transformers module -> the pdmoe module that registers itself with it.
TRIGGERS = {
    "transformers.models.auto.configuration_auto": "pdmoe.config",
    "transformers.models.auto.modeling_auto": "pdmoe.modeling",
    "transformers.integrations.moe": "pdmoe.kernels",
}


class _RunHooksAfterLoading(importlib.abc.Loader):
    """Wraps a module's own loader: runs ``hooks`` once the module has executed."""

    def __init__(self, loader: importlib.abc.Loader, hooks: list[Callable[[], None]]) -> None:
        self._loader = loader
        self._hooks = hooks

    def create_module(self, spec: Any) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        for hook in self._hooks:
            _run(hook)

    def __getattr__(self, name: str) -> Any:  # get_source, is_package, resource readers, ...
        return getattr(self._loader, name)


class _PostImportFinder(importlib.abc.MetaPathFinder):
    """Finds nothing itself; hands out the real spec of a watched module with its loader wrapped."""

    def __init__(self) -> None:
        self.hooks: dict[str, list[Callable[[], None]]] = {}
        self._finding: set[str] = set()

    def find_spec(self, fullname: str, path: Any, target: ModuleType | None = None) -> Any:
        if fullname not in self.hooks or fullname in self._finding:
            return None
        self._finding.add(fullname)
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            self._finding.discard(fullname)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _RunHooksAfterLoading(spec.loader, self.hooks.pop(fullname))
        return spec


_FINDER = _PostImportFinder()


def _run(hook: Callable[[], None]) -> None:
    """A failing registration must not break the transformers import that triggered it."""
    try:
        hook()
    except Exception as error:  # reported; the import that triggered it goes on
        warnings.warn(f"pdmoe could not register with transformers: {error!r}", stacklevel=2)


def when_imported(module: str, hook: Callable[[], None]) -> None:
    """Run ``hook`` right after ``module`` is imported, or now when it already is."""
    if module in sys.modules:
        _run(hook)
        return
    _FINDER.hooks.setdefault(module, []).append(hook)
    if _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)


def register_when_transformers_loads() -> None:
    """Arrange every registration of ``TRIGGERS`` (idempotent)."""
    for trigger, module in TRIGGERS.items():
        if module in sys.modules or any(
            getattr(hook, "args", None) == (module,) for hook in _FINDER.hooks.get(trigger, [])
        ):
            continue
        when_imported(trigger, partial(importlib.import_module, module))
