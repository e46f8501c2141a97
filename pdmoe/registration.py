"""pdmoe's models join transformers when transformers loads the machinery that looks them up.

``pdmoe.config`` registers ``MoEConfig`` with ``AutoConfig``, ``pdmoe.modeling`` registers
``MoEForCausalLM`` with ``AutoModelForCausalLM`` and ``pdmoe.kernels`` the experts implementation
``"pdmoe"``, each when imported. Importing them up front would cost every ``pdmoe`` command the
start-up and memory of transformers' models; instead ``import pdmoe`` arranges the registrations
right after the transformers module that needs them is imported (or at once when it already is):

* ``AutoConfig`` (``configuration_auto``): ``pdmoe.config`` is imported;
* ``AutoModelForCausalLM`` (``modeling_auto``): a stand-in class is registered that imports
  ``pdmoe.modeling`` on first use. transformers may load its Auto classes in the middle of
  importing a model family's modules, which ``pdmoe.modeling`` itself needs, so it cannot be
  imported at that moment; importing it replaces the stand-in with the real class;
* the MoE integration (``integrations.moe``): ``pdmoe.kernels`` is imported.

So ``import pdmoe`` followed by ``AutoModelForCausalLM.from_pretrained(a_pdmoe_checkpoint)`` works,
and a process that never touches transformers' models never loads them.
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


class _ImportOnFirstUse(type):
    """Attributes the stand-in lacks (``from_pretrained``, ``_from_config``, ...) are the real class's."""

    def __getattr__(cls, name: str) -> Any:
        return getattr(importlib.import_module("pdmoe.modeling").MoEForCausalLM, name)


def register_model_stand_in() -> None:
    """Register ``MoEForCausalLM`` by a stand-in that loads ``pdmoe.modeling`` when first used."""
    from transformers import AutoModelForCausalLM

    from pdmoe.config import MoEConfig

    if "pdmoe.modeling" in sys.modules:
        return
    stand_in = _ImportOnFirstUse("MoEForCausalLM", (), {"config_class": MoEConfig, "__module__": __name__})
    AutoModelForCausalLM.register(MoEConfig, stand_in, exist_ok=True)


# transformers module -> what registers pdmoe with it.
TRIGGERS: dict[str, Callable[[], object]] = {
    "transformers.models.auto.configuration_auto": partial(importlib.import_module, "pdmoe.config"),
    "transformers.models.auto.modeling_auto": register_model_stand_in,
    "transformers.integrations.moe": partial(importlib.import_module, "pdmoe.kernels"),
}


class _RunHooksAfterLoading(importlib.abc.Loader):
    """Wraps a module's own loader: runs ``hooks`` once the module has executed."""

    def __init__(self, loader: importlib.abc.Loader, hooks: list[Callable[[], object]]) -> None:
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
        self.hooks: dict[str, list[Callable[[], object]]] = {}
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


def _run(hook: Callable[[], object]) -> None:
    """A failing registration must not break the transformers import that triggered it."""
    try:
        hook()
    except Exception as error:  # reported; the import that triggered it goes on
        warnings.warn(f"pdmoe could not register with transformers: {error!r}", stacklevel=2)


def when_imported(module: str, hook: Callable[[], object]) -> None:
    """Run ``hook`` right after ``module`` is imported, or now when it already is."""
    if module in sys.modules:
        _run(hook)
        return
    _FINDER.hooks.setdefault(module, []).append(hook)
    if _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)


def register_when_transformers_loads() -> None:
    """Arrange every registration of ``TRIGGERS`` (once per process)."""
    global _ARRANGED
    if not _ARRANGED:
        _ARRANGED = True
        for trigger, hook in TRIGGERS.items():
            when_imported(trigger, hook)


_ARRANGED = False
