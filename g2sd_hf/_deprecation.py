"""Old import paths that keep working, with a warning naming the new one."""

import importlib
import warnings


def moved_names(module_name: str, new_homes: dict[str, str], stacklevel: int = 2):
    """A module `__getattr__` that serves `new_homes`' names (`old name -> "package.module"` or
    `"package.module:new_name"`) from their new modules, with a `FutureWarning` saying where they live now."""

    def __getattr__(name: str):
        if name not in new_homes:
            raise AttributeError(f"module {module_name!r} has no attribute {name!r}")
        target, _, new_name = new_homes[name].partition(":")
        new_name = new_name or name
        warnings.warn(
            f"`{module_name}.{name}` moved to `{target}.{new_name}` and will be removed from `{module_name}` in "
            f"g2sd-hf 0.3: import it from `{target}`.",
            FutureWarning,
            stacklevel=stacklevel,
        )
        return getattr(importlib.import_module(target), new_name)

    return __getattr__
