"""shim/prefork.py: fresh code objects for our packages' functions, old ones kept."""

from __future__ import annotations

import sys
import types

from shim import prefork

SOURCE = """
def outer(x):
    def inner(y):
        return x + y
    return inner(1)

class K:
    def method(self):
        return "m"

    @staticmethod
    def static():
        return "s"

    @property
    def prop(self):
        return "p"
"""


def test_compact_code_replaces_code_of_package_functions() -> None:
    mod = types.ModuleType("pfpkg.mod")
    exec(compile(SOURCE, "pfpkg/mod.py", "exec"), mod.__dict__)
    mod.__dict__["foreign"] = len  # not a function defined here: left alone
    before = {
        "outer": mod.outer.__code__,
        "method": mod.K.method.__code__,
        "static": mod.K.__dict__["static"].__func__.__code__,
        "prop": mod.K.prop.fget.__code__,
    }
    sys.modules["pfpkg.mod"] = mod
    try:
        assert prefork.compact_code(("pfpkg",)) == 4
    finally:
        del sys.modules["pfpkg.mod"]
    after = {
        "outer": mod.outer.__code__,
        "method": mod.K.method.__code__,
        "static": mod.K.__dict__["static"].__func__.__code__,
        "prop": mod.K.prop.fget.__code__,
    }
    for name, code in before.items():
        assert after[name] is not code, name
        assert after[name].co_code == code.co_code
        # Kept alive: freeing it would leave a hole the daemon fills.
        assert any(old is code for old in prefork._retired)
    nested = [c for c in after["outer"].co_consts if isinstance(c, types.CodeType)]
    old_nested = [c for c in before["outer"].co_consts if isinstance(c, types.CodeType)]
    assert nested and nested[0] is not old_nested[0]
    assert (mod.outer(2), mod.K().method(), mod.K.static(), mod.K().prop) == (3, "m", "s", "p")
