"""Child side of ``python -m wqsupervisor run``: run a script as if directly, supervised.

Before the script starts, an import hook wraps ``WorkQueue.__init__`` of
``ndcctools.work_queue``, Debian's ``work_queue`` and
:class:`wqsupervisor.wqserver.WorkQueueServer`, so that every master the script
creates gets a supervisor from the parent's engine. Nothing else of the
master changes.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.abc
import importlib.machinery
import json
import os
import runpy
import sys
import weakref
from collections.abc import Sequence
from types import ModuleType
from typing import Any

from .config import Settings, settings_from_kwargs
from .errors import WQSupervisorError
from .supervisor import ENGINE_ENV, Supervisor

SETTINGS_ENV = "WQSUPERVISOR_RUN_SETTINGS"
_TARGETS = {
    "ndcctools.work_queue": "WorkQueue",
    "work_queue": "WorkQueue",
    "wqsupervisor.wqserver": "WorkQueueServer",
}
_supervisors: list[Supervisor] = []


def _patch(module: ModuleType, engine: str, settings: Settings) -> None:
    cls = getattr(module, _TARGETS[module.__name__], None)
    if cls is None or getattr(cls.__init__, "_wqsupervised", False):
        return
    original = cls.__init__

    @functools.wraps(original)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        sup = Supervisor(self, settings, engine=engine, log_events=False)
        _supervisors.append(sup)
        with contextlib.suppress(TypeError):
            weakref.finalize(self, sup.close)

    __init__._wqsupervised = True  # type: ignore[attr-defined]
    cls.__init__ = __init__


class _Loader(importlib.abc.Loader):
    def __init__(self, inner: importlib.abc.Loader, engine: str, settings: Settings) -> None:
        self._inner = inner
        self._engine = engine
        self._settings = settings

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._inner.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._inner.exec_module(module)
        _patch(module, self._engine, self._settings)


class _Finder(importlib.abc.MetaPathFinder):
    """Wraps the loader of the master modules so they are patched once loaded."""

    def __init__(self, engine: str, settings: Settings) -> None:
        self._engine = engine
        self._settings = settings

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in _TARGETS:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _Loader(spec.loader, self._engine, self._settings)
                return spec
        return None


def install(engine: str, settings: Settings) -> None:
    """Patch the master classes already imported, and those imported later."""
    for name in _TARGETS:
        if name in sys.modules:
            _patch(sys.modules[name], engine, settings)
    sys.meta_path.insert(0, _Finder(engine, settings))


def main(argv: list[str] | None = None) -> None:
    """Run the script named first in ``argv`` with the rest as its arguments."""
    args = sys.argv[1:] if argv is None else argv
    engine = os.environ.pop(ENGINE_ENV, None)
    raw = os.environ.pop(SETTINGS_ENV, None)
    if not args or engine is None or raw is None:
        print(
            "wqsupervisor: _bootstrap is started by 'python -m wqsupervisor run', not by hand",
            file=sys.stderr,
        )
        raise SystemExit(2)
    data = json.loads(raw)
    settings = settings_from_kwargs({k: v for k, v in data.items() if v is not None})
    install(engine, settings)
    script = os.path.abspath(args[0])
    sys.argv = [args[0], *args[1:]]
    sys.path[0] = os.path.dirname(script)
    try:
        runpy.run_path(script, run_name="__main__")
    except WQSupervisorError as exc:
        print(f"wqsupervisor: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    finally:
        for sup in _supervisors:
            with contextlib.suppress(Exception):
                sup.close(timeout=5)


if __name__ == "__main__":
    main()
