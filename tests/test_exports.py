"""The public surface: everything public is exported, and documented."""

from __future__ import annotations

import inspect

import wqsupervisor


def test_all_lists_every_public_name():
    """__all__ is exactly the public names the package module defines or re-exports."""
    public = {name for name in dir(wqsupervisor) if not name.startswith("_")}
    modules = {name for name in public if inspect.ismodule(getattr(wqsupervisor, name))}
    assert set(wqsupervisor.__all__) == (public - modules) | {"__version__"}


def test_every_export_has_a_docstring():
    """Each exported class and function says what it is for."""
    for name in wqsupervisor.__all__:
        obj = getattr(wqsupervisor, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            assert inspect.getdoc(obj), name
