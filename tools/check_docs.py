"""Check that the commands and Python calls in the docs exist in the code.

    python tools/check_docs.py                  # README.md, docs/*.md, notebooks/*.ipynb
    python tools/check_docs.py docs/tuning.md   # just these files

In fenced code blocks (and notebook code cells) it checks:

* every ``python -m jaxlora.<module> ...`` names a module with a ``main``; for ``jaxlora.train``
  the ``key=value`` arguments must build a valid config (recipe names, keys, types and ranges;
  only the key is checked where the value is a shell variable or a ``<placeholder>``); for
  ``jaxlora.generate`` and ``jaxlora.export`` the arguments must parse with the module's own CLI
  parser (placeholders stand for any value);
* every ``jaxlora`` name a Python block imports or uses as ``jaxlora.x.y`` exists, and every call
  of a ``jaxlora`` function or class passes only keyword arguments its signature accepts.

It imports jaxlora but runs nothing heavy: no model is loaded, no file is read but the docs.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib
import inspect
import json
import re
import shlex
import sys
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^([ \t]*)```(\w*)[^\n]*\n(.*?)^\1```", re.S | re.M)
PLACEHOLDER = re.compile(r"\$|<[^>]*>")
SHELL_LANGS = {"bash", "sh", "shell", "console", ""}


def code_blocks(path: Path) -> Iterator[tuple[str, str, int]]:
    """``(language, code, line)`` for each fenced block of a .md file or code cell of a notebook."""
    text = path.read_text()
    if path.suffix == ".ipynb":
        for i, cell in enumerate(json.loads(text)["cells"]):
            source = "".join(cell["source"])
            if cell["cell_type"] == "code":
                yield "python", source, i
            else:  # fenced blocks inside markdown cells
                for lang, code, _ in _fenced(source):
                    yield lang, code, i
        return
    yield from _fenced(text)


def _fenced(text: str) -> Iterator[tuple[str, str, int]]:
    for m in FENCE.finditer(text):
        indent = m.group(1)
        code = "\n".join(line.removeprefix(indent) for line in m.group(3).splitlines())
        yield m.group(2).lower(), code, text.count("\n", 0, m.start()) + 1


def _shell_commands(code: str) -> Iterator[list[str]]:
    """Each simple command of a shell snippet as tokens (continuations joined, comments cut)."""
    code = code.replace("\\\n", " ")
    for line in code.splitlines():
        line = line.strip().removeprefix("$ ").removeprefix("!")
        if not line or line.startswith("#"):
            continue
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
        lexer.whitespace_split = True
        lexer.commenters = "#"
        tokens: list[str] = []
        for tok in lexer:
            if tok in (";", "&&", "||", "|", "&"):
                yield tokens
                tokens = []
            else:
                tokens.append(tok)
        yield tokens


def jaxlora_invocations(tokens: list[str]) -> Iterator[tuple[str, list[str]]]:
    """``(module, args)`` for ``python -m jaxlora.X args``, also inside quoted ``--command``s."""
    for i, tok in enumerate(tokens):
        if " " in tok and "jaxlora." in tok:  # e.g. gcloud ... --command "python -m ..."
            for inner in _shell_commands(tok):
                yield from jaxlora_invocations(inner)
        elif re.fullmatch(r"(\S*/)?python[0-9.]*", tok) and tokens[i + 1 : i + 2] == ["-m"]:
            module = tokens[i + 2] if len(tokens) > i + 2 else ""
            if module.startswith("jaxlora"):
                yield module, tokens[i + 3 :]


def check_invocation(module: str, args: list[str]) -> list[str]:
    """Problems with one ``python -m <module> args`` (empty when it would be accepted)."""
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        return [f"python -m {module}: no such module ({e})"]
    if not callable(getattr(mod, "main", None)):
        return [f"python -m {module}: the module has no main()"]
    if any(a in ("-h", "--help") for a in args):
        return []
    try:
        if module == "jaxlora.train":
            _check_train_args(args)
        elif module == "jaxlora.generate":
            _check_cli_args(mod.GenerateArgs, args, repeatable=("prompt",))
        elif module == "jaxlora.export":
            _check_cli_args(mod.ExportArgs, args)
    except SystemExit as e:
        return [f"python -m {module} {' '.join(args)}: {e}"]
    except Exception as e:  # a ConfigError and friends: the message names the key
        return [f"python -m {module} {' '.join(args)}: {type(e).__name__}: {e}"]
    return []


def _check_cli_args(cls: type, args: list[str], repeatable: tuple[str, ...] = ()) -> None:
    """Every key exists; with no placeholder left, the whole command line validates."""
    from jaxlora.config import from_argv
    from jaxlora.config.typed import build, coerce, fields, parse_override

    for a in args:
        parse_override(a.partition("=")[0] + "=null", cls)  # the key must exist
        if not PLACEHOLDER.search(a):  # and a written value must fit its field
            ((key, value),) = parse_override(a, cls).items()
            if dataclasses.is_dataclass(tp := fields(cls)[key]):  # a sub-section (gguf.type=...)
                build(tp, value, f"{key}.")
            else:
                coerce([value] if key in repeatable else value, tp, key)
    if not any(PLACEHOLDER.search(a) for a in args):
        from_argv(cls, args, repeatable=repeatable)


def _check_train_args(args: list[str]) -> None:
    from jaxlora.config import Config, ConfigError, config_from_argv
    from jaxlora.config.typed import parse_override

    concrete = []
    for a in args:
        if "=" not in a:
            raise ConfigError(f"argument {a!r} is not key=value")
        if PLACEHOLDER.search(a.partition("=")[2]):
            if not a.startswith("recipe="):
                parse_override(a.partition("=")[0] + "=null", Config)  # the key must exist
        else:
            concrete.append(a)
    config_from_argv(concrete)


class _Instance:
    """An object of a jaxlora class, bound by ``x = f(...)`` where ``f`` is annotated to return it."""

    def __init__(self, cls: type) -> None:
        self.cls = cls

    def attribute(self, name: str) -> Any:
        """The class attribute (a method), ``...`` for a plain field, ``None`` if neither."""
        if hasattr(self.cls, name):
            attr = getattr(self.cls, name)
            return attr if callable(attr) else ...
        fields = getattr(self.cls, "__dataclass_fields__", {})
        return ... if name in fields or name in getattr(self.cls, "__annotations__", {}) else None


def _returns(fn: Any) -> type | None:
    """The jaxlora class ``fn`` is annotated to return, if any."""
    try:
        ret = typing.get_type_hints(fn).get("return")
    except Exception:  # unresolvable annotations: nothing to learn
        return None
    if inspect.isclass(fn) and fn.__module__.startswith("jaxlora"):
        return fn
    return ret if inspect.isclass(ret) and ret.__module__.startswith("jaxlora") else None


class _Resolver(ast.NodeVisitor):
    """Resolves names bound to jaxlora objects by imports and checks their uses."""

    def __init__(self) -> None:
        self.names: dict[str, Any] = {}
        self.problems: list[str] = []

    def _import(self, dotted: str) -> Any:
        try:
            return importlib.import_module(dotted)
        except ImportError as e:
            self.problems.append(f"import {dotted}: {e}")
            return None

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if alias.name.split(".")[0] != "jaxlora":
                continue
            mod = self._import(alias.name)
            if mod is not None:
                top = alias.asname or "jaxlora"
                self.names[top] = mod if alias.asname else importlib.import_module("jaxlora")

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if not (node.module or "").startswith("jaxlora"):
            return
        mod = self._import(node.module)
        for alias in node.names if mod is not None else ():
            obj = self._attr(mod, alias.name, f"from {node.module} import {alias.name}")
            if obj is not None:
                self.names[alias.asname or alias.name] = obj

    def _attr(self, obj: Any, name: str, where: str) -> Any:
        if hasattr(obj, name):
            return getattr(obj, name)
        if inspect.ismodule(obj):
            try:
                return importlib.import_module(f"{obj.__name__}.{name}")
            except ImportError:
                pass
        self.problems.append(f"{where}: {getattr(obj, '__name__', obj)!s} has no {name!r}")
        return None

    def resolve(self, node: ast.expr) -> Any:
        if isinstance(node, ast.Name):
            return self.names.get(node.id)
        if isinstance(node, ast.Attribute):
            base = self.resolve(node.value)
            if isinstance(base, _Instance):
                attr = base.attribute(node.attr)
                if attr is None:
                    self.problems.append(
                        f"{ast.unparse(node)}: {base.cls.__name__} has no {node.attr!r}"
                    )
                return attr if callable(attr) else None
            if base is not None and (inspect.ismodule(base) or inspect.isclass(base)):
                return self._attr(base, node.attr, ast.unparse(node))
        return None

    def visit_Assign(self, node: ast.Assign) -> None:
        self.visit(node.value)
        fn = self.resolve(node.value.func) if isinstance(node.value, ast.Call) else None
        cls = _returns(fn) if callable(fn) else None
        for target in node.targets:
            if isinstance(target, ast.Name):
                if cls is not None:
                    self.names[target.id] = _Instance(cls)
                else:
                    self.names.pop(target.id, None)

    def visit_Attribute(self, node: ast.Attribute) -> None:
        self.resolve(node)

    def visit_Call(self, node: ast.Call) -> None:
        fn = self.resolve(node.func)
        if callable(fn) and not any(k.arg is None for k in node.keywords):
            try:
                sig = inspect.signature(fn)
            except (TypeError, ValueError):
                sig = None
            if sig is not None and not any(
                p.kind == p.VAR_KEYWORD for p in sig.parameters.values()
            ):
                for kw in node.keywords:
                    p = sig.parameters.get(kw.arg)
                    if p is None or p.kind == p.POSITIONAL_ONLY:
                        self.problems.append(
                            f"{ast.unparse(node.func)}(): no keyword argument {kw.arg!r} "
                            f"(signature {sig})"
                        )
        for child in [*node.args, *node.keywords]:
            self.visit(child)
        if not isinstance(node.func, ast.Name):
            self.visit(node.func.value if isinstance(node.func, ast.Attribute) else node.func)


def check_python(code: str) -> list[str]:
    """Problems with the jaxlora names and calls in a Python snippet."""
    lines = [ln for ln in code.splitlines() if not ln.lstrip().startswith(("%", "!"))]
    try:
        tree = ast.parse("\n".join(lines))
    except SyntaxError as e:
        return [f"not valid Python: {e}"]
    resolver = _Resolver()
    resolver.visit(tree)
    return list(dict.fromkeys(resolver.problems))  # a chain is resolved once per enclosing node


def check_file(path: Path) -> list[str]:
    problems = []
    for lang, code, line in code_blocks(path):
        where = f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}:{line}"
        found = []
        if lang in SHELL_LANGS:
            for tokens in _shell_commands(code):
                for module, args in jaxlora_invocations(tokens):
                    found += check_invocation(module, args)
        elif lang in ("python", "py"):
            found += check_python(code)
            for tokens in _shell_commands("\n".join(re.findall(r"^\s*!(.*)$", code, re.M))):
                for module, args in jaxlora_invocations(tokens):
                    found += check_invocation(module, args)
        problems += [f"{where}: {p}" for p in found]
    return problems


def default_paths() -> list[Path]:
    return [
        ROOT / "README.md",
        *sorted((ROOT / "docs").glob("*.md")),
        *sorted((ROOT / "notebooks").glob("*.ipynb")),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="*", type=Path)
    args = parser.parse_args(argv)
    problems = []
    for path in [p.resolve() for p in args.paths] or default_paths():
        problems += check_file(path)
    for p in problems:
        print(p, file=sys.stderr)
    print(f"check_docs: {len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
