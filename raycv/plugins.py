"""Your own models and datasets without forking raycv.

A plugin is a Python module that registers into raycv's registries when it is imported:

    from raycv.models import register_model

    @register_model("my_cnn", default_input_size=32)
    def my_cnn(*, num_classes, weights=None, **kwargs): ...

Two ways in:

- `run.plugins: [my_module]` in a recipe, or `--import my_module` on the command line: the driver
  imports it before Ray starts, and every Ray Train worker and inference actor imports it again
  before it builds a model or reads data. The current folder is on the import path (as with
  `python -m`); Ray puts the driver's folder on its workers' path locally, and `ray job submit`
  / `raycv submit` ship the working directory to the cluster, so the module travels with the job.
- an installed package's entry points in the groups `raycv.models` and `raycv.datasets`
  (`module` or `module:function`; a function is called with no arguments): loaded the first
  time a registry is asked for a name, in every process.

A plugin that fails to import, or registers a name that exists, is one line naming it.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Iterable

from raycv.errors import UserError

ENTRY_POINT_GROUPS = ("raycv.models", "raycv.datasets")

_imported: set[str] = set()
_entry_points_done = False


class NameTaken(UserError):
    """A registry already holds this name (raised by `register_model` / `register_dataset`)."""


def _describe(e: BaseException) -> str:
    first = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def load_entry_points() -> None:
    """Import every installed `raycv.models` / `raycv.datasets` entry point, once per process."""
    global _entry_points_done
    if _entry_points_done:
        return
    _entry_points_done = True  # before loading: a plugin that looks a name up must not recurse
    from importlib.metadata import entry_points

    for group in ENTRY_POINT_GROUPS:
        for ep in entry_points(group=group):
            what = f"entry point {ep.name!r} ({ep.value}) of group {group}"
            try:
                obj = ep.load()
                if ep.attr and callable(obj):
                    obj()
            except NameTaken as e:
                raise UserError(f"plugin {what}: {e}") from None
            except Exception as e:
                raise UserError(f"plugin {what} failed to load: {_describe(e)}") from None


def load(modules: Iterable[str] = ()) -> None:
    """Import the named plugin modules (once each per process) and the installed entry points."""
    load_entry_points()
    for name in modules:
        if name in _imported:
            continue
        if os.getcwd() not in sys.path and "" not in sys.path:
            sys.path.insert(1, os.getcwd())  # like `python -m`: a module in the current folder imports
        try:
            importlib.import_module(name)
        except NameTaken as e:
            raise UserError(f"plugin {name!r}: {e}") from None
        except Exception as e:
            raise UserError(f"plugin {name!r} failed to import: {_describe(e)}") from None
        _imported.add(name)
