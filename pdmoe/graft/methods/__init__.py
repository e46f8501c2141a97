"""The merge methods of ``pdmoe graft --method``: one module each in this package, registered in
``registry``. Loads without torch.

Adding a method: a ``MergeMethod`` member in ``registry`` and a module here with its
``@register``-ed strategy; every module of the package is imported below, so nothing else lists it.
"""

import importlib
import pkgutil

from pdmoe.graft.methods.registry import (
    MergeMethod,
    MergeSpec,
    MergeStrategy,
    TaskVectorMerge,
    check_registry,
    strategy,
)

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")  # each method module registers itself
check_registry()

__all__ = ["MergeMethod", "MergeSpec", "MergeStrategy", "TaskVectorMerge", "strategy"]
