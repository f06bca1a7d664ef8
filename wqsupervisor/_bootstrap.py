"""Child side of ``python -m wqsupervisor run``: run a script as if directly, supervised.

Before the script starts, an import hook wraps ``WorkQueue.__init__`` of
``ndcctools.work_queue``, Debian's ``work_queue`` and
:class:`wqsupervisor.wqserver.WorkQueueServer`, and ``Manager.__init__`` of
``ndcctools.taskvine``, so that every master the script
creates gets a supervisor from the parent's engine. Nothing else of the
master changes.

The script's own Python children follow: a forked one inherits the hook, and
every Python process it starts (multiprocessing's spawn, as Parsl's executors
use, or ``subprocess``) imports :data:`SITECUSTOMIZE` from a directory on its
``PYTHONPATH``, which installs the same hook from the inherited environment.
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
BOOTSTRAP = "import sys; from wqsupervisor._bootstrap import main; main(sys.argv[1:])"
"""The script process's ``python -c`` program: :func:`main` of this very module."""
_TARGETS = {
    "ndcctools.work_queue": "WorkQueue",
    "work_queue": "WorkQueue",
    "wqsupervisor.wqserver": "WorkQueueServer",
    # TaskVine's Manager, where it is defined (ndcctools.taskvine re-exports the same class).
    "ndcctools.taskvine.manager": "Manager",
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

    wqsupervisor_hook = True

    def __init__(self, engine: str, settings: Settings) -> None:
        self._engine = engine
        self._settings = settings

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in _TARGETS:
            return None
        for finder in sys.meta_path:
            # Never another hook of ours (from another copy of this module): each would ask the other.
            if getattr(finder, "wqsupervisor_hook", False) or not hasattr(finder, "find_spec"):
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
    if not any(getattr(finder, "wqsupervisor_hook", False) for finder in sys.meta_path):
        sys.meta_path.insert(0, _Finder(engine, settings))


# Imported at the start of every Python process the script starts (see follow()); it then
# imports the next sitecustomize on the path, if any, so the user's own still runs.
SITECUSTOMIZE = """\
import importlib, os, sys
if os.environ.get("@ENGINE@") and os.environ.get("@SETTINGS@"):
    try:
        from wqsupervisor._bootstrap import follow
        follow()
    except Exception as exc:  # the child runs unsupervised rather than not at all
        print("wqsupervisor: a child process is not supervised:", exc, file=sys.stderr)
_here = os.path.dirname(os.path.abspath(__file__))
_path, sys.path[:] = sys.path[:], [p for p in sys.path if os.path.abspath(p or ".") != _here]
_self = sys.modules.pop("sitecustomize", None)
try:
    importlib.import_module("sitecustomize")
except ImportError:  # none of the user's: this module stays the one site imported
    if _self is not None:
        sys.modules["sitecustomize"] = _self
finally:
    sys.path[:] = _path
""".replace("@ENGINE@", ENGINE_ENV).replace("@SETTINGS@", SETTINGS_ENV)


def follow_directory(rundir: str) -> str:
    """Write the children's ``sitecustomize.py`` into ``rundir``/follow; returns that directory."""
    folder = os.path.join(rundir, "follow")
    os.makedirs(folder, mode=0o700, exist_ok=True)
    path = os.path.join(folder, "sitecustomize.py")
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        fh.write(SITECUSTOMIZE)
    os.replace(tmp, path)
    return folder


def follow() -> None:
    """In a Python process the script started: supervise its masters too, through the same engine."""
    engine = os.environ.get(ENGINE_ENV)
    raw = os.environ.get(SETTINGS_ENV)
    if engine is None or raw is None:
        return
    data = json.loads(raw)
    install(engine, settings_from_kwargs({k: v for k, v in data.items() if v is not None}))
    import atexit

    atexit.register(_close_all)


def _close_all() -> None:
    for sup in _supervisors:
        with contextlib.suppress(Exception):
            sup.close(timeout=5)


def main(argv: list[str] | None = None) -> None:
    """Run the script named first in ``argv`` with the rest as its arguments."""
    args = sys.argv[1:] if argv is None else argv
    # Left in the environment: the script's Python children follow (see follow()).
    engine = os.environ.get(ENGINE_ENV)
    raw = os.environ.get(SETTINGS_ENV)
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
        _close_all()


if __name__ == "__main__":
    main()
