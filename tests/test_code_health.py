"""No module-level mutable caches in mirage_jax: derived state belongs to the object it derives from.

A module-level dict keyed by `id(stats)` outlives its object, holds device memory nobody can free,
and can hand a new object the entry of a dead one that had the same address. The checks read the
source with `ast` (nothing is imported or run) and flag:

- a module- or class-level name bound to an empty mutable container (``{}``, ``[]``, ``dict()``,
  ``set()``, ``defaultdict(...)``, ``WeakKeyDictionary()``, ...): a cache waiting to be filled;
- a module-level name that a function mutates (item assignment or deletion, ``.update``,
  ``.setdefault``, ``.append``, ``.clear``, ... or a ``global`` statement);
- ``functools.lru_cache`` / ``functools.cache`` on a function with a parameter that is not a plain
  value (str, int, float, bool, bytes, tuples / frozensets of those, None, a ``...Config``
  hyper-parameter dataclass): arrays, parameter trees, statistics or tokenizers would be keyed
  by identity or kept alive by the cache;
- any call of the builtin ``id``: object identity is never a key.

Constant tables (non-empty literals, tuples, frozensets, comprehensions built once) are not flagged.
"""

from __future__ import annotations

import ast
import textwrap
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mirage_jax"

EMPTY_CONTAINER_CALLS = {"dict", "list", "set", "bytearray", "OrderedDict", "deque", "Counter",
                         "WeakKeyDictionary", "WeakValueDictionary", "WeakSet"}
ALWAYS_MUTABLE_CALLS = {"defaultdict"}  # filled on first read, whatever its argument
MUTATING_METHODS = {"append", "extend", "insert", "add", "update", "setdefault", "pop", "popitem", "clear",
                    "remove", "discard", "__setitem__", "__delitem__"}
CACHE_DECORATORS = {"lru_cache", "cache"}
VALUE_ANNOTATIONS = {"str", "int", "float", "bool", "bytes", "tuple", "frozenset", "None", "Optional", "Union",
                     "Literal", "Tuple", "FrozenSet"}


def _name(node: ast.AST) -> str | None:
    """`x` for Name x, `b` for Attribute a.b, else None."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return None


def _is_empty_mutable(value: ast.AST | None) -> bool:
    if isinstance(value, (ast.Dict, ast.List, ast.Set)):
        return not (value.keys if isinstance(value, ast.Dict) else value.elts)
    if isinstance(value, ast.Call):
        name = _name(value.func)
        return name in ALWAYS_MUTABLE_CALLS or (name in EMPTY_CONTAINER_CALLS and not value.args)
    return False


def _targets(stmt: ast.stmt) -> list[ast.AST]:
    if isinstance(stmt, ast.Assign):
        return stmt.targets
    if isinstance(stmt, (ast.AnnAssign, ast.AugAssign)):
        return [stmt.target]
    return []


def _stored_names(targets: list[ast.AST]) -> set[str]:
    return {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}


def _scope_statements(body: list[ast.stmt]):
    """Statements that run at module (or class) level, through if / try / with / for blocks but
    not into function bodies."""
    for stmt in body:
        yield stmt
        if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        for field in ("body", "orelse", "finalbody", "handlers"):
            inner = getattr(stmt, field, None)
            if isinstance(inner, list):
                yield from _scope_statements([s for s in inner if isinstance(s, ast.stmt)] +
                                             [s for h in inner if isinstance(h, ast.ExceptHandler) for s in h.body])


def _value_annotation(ann: ast.AST | None) -> bool:
    if ann is None:
        return False
    if isinstance(ann, ast.Constant):  # None, the ... of tuple[int, ...], or a string annotation
        if ann.value is None or ann.value is Ellipsis:
            return True
        return isinstance(ann.value, str) and _value_annotation(ast.parse(ann.value, mode="eval").body)
    if isinstance(ann, ast.Subscript):
        if _name(ann.value) == "Literal":
            return True
        return _value_annotation(ann.value) and _value_annotation(ann.slice)
    if isinstance(ann, ast.Tuple):
        return all(_value_annotation(e) for e in ann.elts)
    if isinstance(ann, ast.BinOp) and isinstance(ann.op, ast.BitOr):
        return _value_annotation(ann.left) and _value_annotation(ann.right)
    name = _name(ann)
    return name is not None and (name in VALUE_ANNOTATIONS or name.endswith("Config"))


def _cache_decorated(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    for dec in fn.decorator_list:
        target = dec.func if isinstance(dec, ast.Call) else dec
        if _name(target) in CACHE_DECORATORS:
            return True
    return False


def mutable_cache_findings(source: str, where: str = "<source>") -> list[str]:
    """'file:line: what' for every pattern the module docstring lists."""
    tree = ast.parse(source)
    found = []
    module_names: set[str] = set()
    scopes = [tree.body] + [s.body for s in _scope_statements(tree.body) if isinstance(s, ast.ClassDef)]
    for body in scopes:
        for stmt in _scope_statements(body):
            names = _stored_names(_targets(stmt))
            if body is tree.body:
                module_names |= names
            if _is_empty_mutable(getattr(stmt, "value", None)) and names:
                found.append(f"{where}:{stmt.lineno}: module/class-level mutable container {sorted(names)}")
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "id" \
                and "id" not in module_names:
            found.append(f"{where}:{node.lineno}: id(...) used (object identity as a key)")
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        if _cache_decorated(node):
            args = node.args.posonlyargs + node.args.args + node.args.kwonlyargs
            bad = [a.arg for a in args if a.arg not in ("self", "cls") and not _value_annotation(a.annotation)]
            if bad or node.args.vararg or node.args.kwarg:
                found.append(f"{where}:{node.lineno}: lru_cache/cache on {node.name} keyed by non-value "
                             f"parameters {bad or ['*args/**kwargs']}")
        found += _mutated_globals(node, module_names, where)
    return found


def _mutated_globals(fn: ast.FunctionDef | ast.AsyncFunctionDef, module_names: set[str], where: str) -> list[str]:
    """Module-level names that `fn` (its own body, not nested functions) mutates."""
    own = list(_own_nodes(fn))
    args = fn.args.posonlyargs + fn.args.args + fn.args.kwonlyargs + [a for a in (fn.args.vararg, fn.args.kwarg) if a]
    declared_global = {n for node in own if isinstance(node, ast.Global) for n in node.names}
    local = {a.arg for a in args} | {n.id for n in own if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
    local -= declared_global
    found = [f"{where}:{fn.lineno}: `global {n}` in {fn.name}" for n in sorted(declared_global)]
    for node in own:
        base = None
        if isinstance(node, ast.Subscript) and isinstance(node.ctx, (ast.Store, ast.Del)):
            base = node.value
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in MUTATING_METHODS:
            base = node.func.value
        if isinstance(base, ast.Name) and base.id in module_names and base.id not in local:
            found.append(f"{where}:{node.lineno}: {fn.name} mutates module-level {base.id!r}")
    return found


def _own_nodes(fn: ast.AST):
    """Nodes of a function's body, not descending into nested functions, lambdas or classes."""
    stack = list(ast.iter_child_nodes(fn))
    while stack:
        node = stack.pop()
        yield node
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            stack.extend(ast.iter_child_nodes(node))


# --- the detector itself ------------------------------------------------------------------------

BAD = {
    "empty dict": "_FACTOR: dict = {}\n",
    "empty list": "SEEN = []\n",
    "dict()": "CACHE = dict()\n",
    "set()": "DONE = set()\n",
    "defaultdict": "import collections\nBY = collections.defaultdict(list)\n",
    "weak dict": "import weakref\nW = weakref.WeakKeyDictionary()\n",
    "class attribute": "class A:\n    memo = {}\n",
    "filled table mutated": "TABLE = {'a': 1}\ndef f(k, v):\n    TABLE[k] = v\n",
    "setdefault": "TABLE = {'a': 1}\ndef f(k):\n    return TABLE.setdefault(k, 0)\n",
    "global": "X = None\ndef f(v):\n    global X\n    X = v\n",
    "id key": "def f(stats, memo):\n    return memo[(id(stats), 1)]\n",
    "lru on stats": "import functools\n@functools.lru_cache(maxsize=4)\ndef p(stats, layer: int):\n    return 1\n",
    "cache on array": "from functools import cache\n@cache\ndef p(x: jax.Array):\n    return x\n",
    "lru on *args": "import functools\n@functools.lru_cache\ndef p(*a):\n    return a\n",
}

GOOD = """
import functools
VARIANTS = ("rome", "r-rome")
WORDS = frozenset({"a", "b"})
TABLE = {"q": "q_proj", "k": "k_proj"}
INDEX = {name: i for i, name in enumerate(VARIANTS)}
__all__ = ["f"]

@functools.lru_cache(maxsize=8)
def opt(hp: MENDConfig, shapes: tuple[tuple[int, int], ...], path: str | None = None) -> int:
    return 1

def f(x):
    out = {}
    out["a"] = x
    TABLE.get("q")
    local = []
    local.append(INDEX["q"])
    return out

class S:
    def __init__(self):
        self._memo = {}

    def get(self, k):
        self._memo[k] = 1
        return self._memo.setdefault(k, 2)
"""


@pytest.mark.parametrize("case", sorted(BAD))
def test_detector_flags_each_kind_of_mutable_cache(case):
    assert mutable_cache_findings(textwrap.dedent(BAD[case])), case


def test_detector_leaves_constants_tables_and_instance_state_alone():
    assert mutable_cache_findings(GOOD) == []


# --- the package ----------------------------------------------------------------------------------


def test_no_module_level_mutable_caches_in_the_package():
    files = sorted(PACKAGE.rglob("*.py"))
    assert files, PACKAGE
    found = [f for p in files for f in mutable_cache_findings(p.read_text(encoding="utf-8"),
                                                              str(p.relative_to(PACKAGE.parent)))]
    assert not found, "module-level mutable state (move it onto the object it derives from):\n" + "\n".join(found)


# --- CI's skip policy (tests/conftest.py) -------------------------------------------------------


def test_a_skip_fails_under_the_ci_policy_unless_marked(tmp_path):
    """`.ci/run` sets MIRAGE_STRICT_SKIPS=1: a test (or module) skipped for a missing dependency
    fails there, one marked `may_skip_in_ci` stays a skip; without the variable both are skips."""
    import os
    import shutil
    import subprocess
    import sys

    shutil.copy(Path(__file__).with_name("conftest.py"), tmp_path / "conftest.py")
    (tmp_path / "test_demo.py").write_text(textwrap.dedent("""
        import pytest

        def test_missing_dependency():
            pytest.importorskip("no_such_module_for_mirage")

        @pytest.mark.may_skip_in_ci
        def test_needs_an_accelerator():
            pytest.skip("no GPU")
    """))
    (tmp_path / "test_module_skip.py").write_text('import pytest\npytest.importorskip("no_such_module_either")\n')

    def outcome(strict: bool) -> str:
        env = {k: v for k, v in os.environ.items() if k != "MIRAGE_STRICT_SKIPS"}
        if strict:
            env["MIRAGE_STRICT_SKIPS"] = "1"
        p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                            "--continue-on-collection-errors", str(tmp_path)],
                           cwd=tmp_path, env=env, capture_output=True, text=True, check=False, timeout=120)
        return p.stdout.strip().splitlines()[-1]

    lenient, strict = outcome(False), outcome(True)
    assert "3 skipped" in lenient and "failed" not in lenient and "error" not in lenient, lenient
    assert "1 failed" in strict and "1 skipped" in strict and "1 error" in strict, strict
