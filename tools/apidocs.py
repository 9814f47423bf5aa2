"""
Check the API documentation, as C{tox -e docs} does.

Two checks, and the exit status is 1 if either finds anything:

  1. pydoctor (epytext) builds the API docs of C{tunnel} and C{tests}; each
     warning it prints is a finding (an epytext error, an unknown field, an
     C{@param} naming no parameter, an C{L{}} link to a name that does not
     exist), except a link to a name outside this project (Twisted,
     zope.interface, the standard library, ...): with no network there is
     no intersphinx inventory to resolve those against, so they are looked
     up in the installed packages instead.
  2. The house rules pydoctor does not check, read from the source: every
     public module, class, function and method of C{tunnel} has a
     docstring, with an C{@param} for each parameter and an C{@return} if
     it returns a value; every public module-level name has a C{#:}
     comment or a docstring; every C{@ivar} names an attribute the class
     (or one of its bases in C{tunnel}) sets, and every public attribute
     set in C{__init__} (or declared in the class body) has one; the
     package docstring links every name of C{tunnel.__all__}; every test
     method has a docstring.

Usage: C{python tools/apidocs.py [HTML_OUTPUT_DIRECTORY]}, from the top of
the checkout.
"""

from __future__ import annotations

import ast
import builtins
import importlib
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: Top-level names whose unresolved links are expected without intersphinx.
EXTERNAL = {
    "twisted",
    "zope",
    "attrs",
    "OpenSSL",
    "service_identity",
    "prometheus_client",
    "bcrypt",
    "hypothesis",
    *sys.stdlib_module_names,
    *dir(builtins),
}

#: pydoctor warnings that are expected, as (file name, message start):
#: C{tunnel/tap.py} computes its C{opt_*} docstrings for C{--help}, which
#: pydoctor cannot evaluate.
EXPECTED = {
    ("tap.py", "Unable to figure out value for __doc__ assignment"),
}

_WARNING = re.compile(r"^(?P<path>[^:\s]+\.py):(?P<line>\d+): (?P<message>.*)$")
_LINK = re.compile(r'^Cannot find link target for "(?P<target>[^"]+)"')

#: Protocol attributes that Twisted documents, set early by our protocols
#: only so that their instances share dict keys.
_TWISTED_ATTRIBUTES = {"transport", "connected"}

_FIELD = re.compile(r"^\s*@(\w+)(?:[ \t]+\*{0,2}(\w+))?", re.MULTILINE)
_NO_VALUE = {"None", "NoReturn", "Never"}


def pydoctorWarnings(output: Path) -> list[str]:
    """
    Build the API docs with pydoctor and collect its unexpected warnings.

    @param output: The directory the HTML goes to.
    @return: One C{path:line: message} line per unexpected warning.
    """
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pydoctor",
            "--quiet",
            "--docformat=epytext",
            "--project-name=tunnel",
            f"--project-base-dir={ROOT}",
            f"--html-output={output}",
            str(ROOT / "tunnel"),
            str(ROOT / "tests"),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    found = []
    for line in (result.stdout + result.stderr).splitlines():
        match = _WARNING.match(line.strip())
        if match is None:
            continue
        message = match["message"]
        link = _LINK.match(message)
        if link is not None and link["target"].split(".")[0] in EXTERNAL:
            if _externalExists(link["target"]):
                continue
            message += " (not found in the installed package either)"
        name = Path(match["path"]).name
        if any(name == f and message.startswith(m) for f, m in EXPECTED):
            continue
        found.append(
            f"{Path(match['path']).relative_to(ROOT)}:{match['line']}: {message}"
        )
    if result.returncode != 0:
        found.append(f"pydoctor exited with status {result.returncode}")
    return found


def _externalExists(target: str) -> bool:
    """
    Whether a link target outside the project names something real, as far
    as the packages installed here can tell.

    @param target: A dotted name such as C{twisted.internet.error.ConnectError}
        or a builtin such as C{None}.
    @return: C{False} only if its top-level package is installed and the
        name is not in it.
    """
    parts = target.split(".")
    if len(parts) == 1 and hasattr(builtins, target):
        return True
    try:
        importlib.import_module(parts[0])
    except ImportError:
        return True  # not installed here: cannot tell
    for end in range(len(parts), 0, -1):
        try:
            found: object = importlib.import_module(".".join(parts[:end]))
        except ImportError:
            continue
        for attribute in parts[end:]:
            if not hasattr(found, attribute):
                return False
            found = getattr(found, attribute)
        return True
    return False


def _fields(docstring: str | None) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for match in _FIELD.finditer(docstring or ""):
        kind = {"arg": "param", "keyword": "param", "returns": "return"}.get(
            match[1], match[1]
        )
        found.setdefault(kind, set()).add(match[2] or "")
    return found


def _parameters(function: ast.FunctionDef, dropFirst: bool) -> list[str]:
    arguments = function.args
    names = [a.arg for a in arguments.posonlyargs + arguments.args]
    if dropFirst and names and "staticmethod" not in _decorators(function):
        names = names[1:]
    names += [a.arg for a in arguments.kwonlyargs]
    names += [a.arg for a in (arguments.vararg, arguments.kwarg) if a is not None]
    return names


def _decorators(node: ast.FunctionDef | ast.ClassDef) -> set[str]:
    return {ast.unparse(d).split("(")[0].split(".")[-1] for d in node.decorator_list}


def _returnsValue(function: ast.FunctionDef) -> bool:
    if function.returns is not None:
        return ast.unparse(function.returns) not in _NO_VALUE

    def walk(nodes: list[ast.stmt]) -> Iterator[ast.AST]:
        for node in nodes:
            yield from ast.walk(node)

    return any(
        isinstance(n, ast.Return)
        and n.value is not None
        and not (isinstance(n.value, ast.Constant) and n.value.value is None)
        for n in walk(function.body)
    )


def _attributesSet(cls: ast.ClassDef) -> set[str]:
    names: set[str] = set()
    for node in cls.body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, ast.Assign):
            names.update(
                n.id
                for t in node.targets
                for n in ast.walk(t)
                if isinstance(n, ast.Name)
            )
        elif isinstance(node, ast.FunctionDef | ast.ClassDef):
            names.add(node.name)
            names.update(
                n.attr
                for n in ast.walk(node)
                if isinstance(n, ast.Attribute)
                and isinstance(n.ctx, ast.Store)
                and isinstance(n.value, ast.Name)
                and n.value.id == "self"
            )
    return names


def _publicAttributes(cls: ast.ClassDef) -> Iterator[tuple[str, int]]:
    for node in cls.body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            yield node.target.id, node.lineno
        if isinstance(node, ast.FunctionDef) and node.name == "__init__":
            for n in ast.walk(node):
                if (
                    isinstance(n, ast.Attribute)
                    and isinstance(n.ctx, ast.Store)
                    and isinstance(n.value, ast.Name)
                    and n.value.id == "self"
                ):
                    yield n.attr, n.lineno


class _Audit:
    """
    The house rules over the parsed modules.

    @ivar findings: One C{path:line: message} line per finding.
    """

    def __init__(self, modules: dict[Path, tuple[str, ast.Module]]) -> None:
        """
        @param modules: The source and the parsed module, by path.
        """
        self.findings: list[str] = []
        self._classes: dict[str, list[ast.ClassDef]] = {}
        for _, module in modules.values():
            for node in ast.walk(module):
                if isinstance(node, ast.ClassDef):
                    self._classes.setdefault(node.name, []).append(node)
        for path, (source, module) in modules.items():
            self._path = path.relative_to(ROOT)
            if path.parent.name == "tests":
                self._tests(module)
            else:
                self._module(module, source.splitlines())

    def _report(self, line: int, message: str) -> None:
        self.findings.append(f"{self._path}:{line}: {message}")

    def _tests(self, module: ast.Module) -> None:
        for node in ast.walk(module):
            if (
                isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
                and node.name.startswith("test_")
                and not ast.get_docstring(node)
            ):
                self._report(node.lineno, f"test method {node.name} has no docstring")

    def _module(self, module: ast.Module, lines: list[str]) -> None:
        if not ast.get_docstring(module):
            self._report(1, "module has no docstring")
        if self._path.name == "__init__.py":
            self._exports(module)
        for index, node in enumerate(module.body):
            if isinstance(node, ast.Assign | ast.AnnAssign):
                self._constant(node, lines, module.body[index + 1 : index + 2])
            elif isinstance(node, ast.FunctionDef):
                self._function(node, None)
            elif isinstance(node, ast.ClassDef):
                self._class(node)

    def _exports(self, module: ast.Module) -> None:
        """
        The package docstring names the whole public API: each name in
        C{__all__}, as an C{L{}} link.
        """
        docstring = ast.get_docstring(module) or ""
        for node in module.body:
            if (
                isinstance(node, ast.Assign)
                and any(
                    isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets
                )
                and isinstance(node.value, ast.List | ast.Tuple)
            ):
                for element in node.value.elts:
                    if isinstance(element, ast.Constant) and (
                        f"L{{{element.value}}}" not in docstring
                    ):
                        self._report(
                            node.lineno,
                            f"{element.value} is in __all__ but not in the docstring",
                        )

    def _constant(
        self, node: ast.Assign | ast.AnnAssign, lines: list[str], after: list[ast.stmt]
    ) -> None:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        names = [
            t.id
            for t in targets
            if isinstance(t, ast.Name) and not t.id.startswith("_")
        ]
        if not names:
            return
        comment = lines[node.lineno - 2].lstrip().startswith("#:")
        docstring = bool(after) and (
            isinstance(after[0], ast.Expr)
            and isinstance(after[0].value, ast.Constant)
            and isinstance(after[0].value.value, str)
        )
        if not (comment or docstring):
            self._report(node.lineno, f"{', '.join(names)}: no #: comment or docstring")

    def _inherited(self, cls: ast.ClassDef, seen: frozenset[str]) -> set[str]:
        names = _attributesSet(cls)
        for base in cls.bases:
            name = ast.unparse(base).split(".")[-1]
            for baseClass in self._classes.get(name, []) if name not in seen else []:
                names |= self._inherited(baseClass, seen | {name})
        return names

    def _class(self, cls: ast.ClassDef) -> None:
        if cls.name.startswith("_"):
            return
        docstring = ast.get_docstring(cls)
        if not docstring:
            self._report(cls.lineno, f"class {cls.name} has no docstring")
        fields = _fields(docstring)
        documented = fields.get("ivar", set()) | fields.get("cvar", set())
        attributes = self._inherited(cls, frozenset({cls.name}))
        for name in sorted(documented - attributes):
            self._report(cls.lineno, f"{cls.name}: @ivar {name}: no such attribute")
        twisted = any(ast.unparse(b) == "Protocol" for b in cls.bases)
        reported = set()
        for name, line in _publicAttributes(cls):
            if (
                name.startswith("_")
                or name in documented
                or name in reported
                or (twisted and name in _TWISTED_ATTRIBUTES)
            ):
                continue
            reported.add(name)
            self._report(line, f"{cls.name}.{name}: no @ivar")
        interface = any(
            ast.unparse(b) == "Interface"
            or (ast.unparse(b) in self._classes and ast.unparse(b).startswith("I"))
            for b in cls.bases
        )
        for node in cls.body:
            if isinstance(node, ast.FunctionDef):
                self._function(node, cls, dropFirst=not interface)

    def _function(
        self,
        function: ast.FunctionDef,
        cls: ast.ClassDef | None,
        dropFirst: bool = True,
    ) -> None:
        name = function.name
        dunder = name.startswith("__") and name.endswith("__")
        if (name.startswith("_") and not dunder) or "overload" in _decorators(function):
            return
        qualified = f"{cls.name}.{name}" if cls is not None else name
        docstring = ast.get_docstring(function)
        # usage.Options prints opt_* docstrings as --help: no fields there.
        if name.startswith("opt_"):
            return
        if not docstring and name != "__init__":
            self._report(function.lineno, f"{qualified}() has no docstring")
            return
        fields = _fields(docstring)
        documented = fields.get("param", set())
        if name == "__init__" and cls is not None:
            documented |= _fields(ast.get_docstring(cls)).get("param", set())
        parameters = _parameters(function, dropFirst=cls is not None and dropFirst)
        missing = [p for p in parameters if p not in documented]
        if missing and not (_decorators(function) & {"property", "setter"}):
            self._report(
                function.lineno, f"{qualified}(): no @param for {', '.join(missing)}"
            )
        if (
            name != "__init__"
            and "property" not in _decorators(function)
            and "return" not in fields
            and _returnsValue(function)
        ):
            self._report(function.lineno, f"{qualified}(): no @return")


def audit() -> list[str]:
    """
    Check the house rules that pydoctor does not.

    @return: One C{path:line: message} line per finding.
    """
    paths = sorted((ROOT / "tunnel").glob("*.py")) + sorted(
        (ROOT / "tests").glob("test_*.py")
    )
    modules = {}
    for path in paths:
        source = path.read_text(encoding="utf-8")
        modules[path] = (source, ast.parse(source, str(path)))
    return _Audit(modules).findings


def main(argv: list[str]) -> int:
    """
    Run both checks and print what they found.

    @param argv: The command-line arguments: the HTML output directory, if
        any (by default C{apidocs}).
    @return: The exit status: 0 if nothing was found.
    """
    output = Path(argv[0]) if argv else ROOT / "apidocs"
    findings = pydoctorWarnings(output) + audit()
    for finding in findings:
        print(finding)
    print(f"API docs in {output}; {len(findings)} finding(s)")
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
