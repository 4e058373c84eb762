"""The import graph's arrows run one way, read from the source (AST), each wrong arrow named by
file and line:

- `shared` (the library) imports neither `services` nor `loadgen`;
- no service imports another service (what two services share lives in `shared`);
- a service that runs no model (tokenizer, gateway, balancer, planner) reaches no `torch` import through
  the modules it loads at start (module-level imports, followed through the repository).
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("shared", "services", "loadgen")
MODEL_FREE = ("tokenizer", "gateway", "balancer", "planner")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, top_level_only: bool = False) -> list[tuple[str, int]]:
    """(absolute module, line) of each import in `path`; relative imports resolved. With
    `top_level_only`, only those that run when the module is imported (not in functions, not
    under `if TYPE_CHECKING`)."""
    tree = ast.parse(path.read_text(), str(path))
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found: list[tuple[str, int]] = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if top_level_only and isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            if top_level_only and isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, ast.Import):
                found.extend((alias.name, child.lineno) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = package[:len(package) - child.level + 1] if child.level else []
                module = ".".join(base + ([child.module] if child.module else []))
                found.append((module, child.lineno))
                # `from pkg import sub`: sub may be a module
                found.extend((f"{module}.{alias.name}", child.lineno) for alias in child.names)
            visit(child)

    visit(tree)
    return found


def sources() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def test_shared_imports_no_service_and_no_loadgen():
    wrong = [f"{path.relative_to(ROOT)}:{line} imports {module}"
             for path in sorted((ROOT / "shared").rglob("*.py")) for module, line in imports(path)
             if module.split(".")[0] in ("services", "loadgen")]
    assert not wrong, "the library must not depend on services or the load generator:\n" + "\n".join(wrong)


def test_no_service_imports_another():
    wrong = []
    for path in sorted((ROOT / "services").rglob("*.py")):
        parts = path.relative_to(ROOT).parts
        if len(parts) < 3:
            continue
        own = parts[1]
        wrong += [f"{path.relative_to(ROOT)}:{line} imports {module}" for module, line in imports(path)
                  if module.startswith("services.") and module.split(".")[1] != own]
    assert not wrong, "services share code through shared/, not each other:\n" + "\n".join(wrong)


def module_file(module: str) -> Path | None:
    base = ROOT.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def torch_chain(start: str) -> list[str] | None:
    """The chain of module-level imports from `start` to a `torch` import, or None."""
    parent: dict[str, tuple[str, int] | None] = {start: None}
    queue = [start]
    while queue:
        module = queue.pop()
        path = module_file(module)
        if path is None:
            continue
        # importing a.b.c runs a/__init__ and a/b/__init__ too
        parents = [".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 1)]
        targets = [(p, 0) for p in parents] + imports(path, top_level_only=True)
        for target, line in targets:
            if target.split(".")[0] == "torch":
                chain, at = [f"{path.relative_to(ROOT)}:{line} imports {target}"], module
                while parent[at] is not None:
                    up, up_line = parent[at]
                    chain.append(f"{module_file(up).relative_to(ROOT)}:{up_line} imports {at}")
                    at = up
                return chain[::-1]
            if target.split(".")[0] in PACKAGES and target not in parent and module_file(target):
                parent[target] = (module, line)
                queue.append(target)
    return None


@pytest.mark.parametrize("service", MODEL_FREE)
def test_a_service_without_a_model_does_not_import_torch(service):
    chain = torch_chain(f"services.{service}.__main__")
    assert chain is None, f"services.{service} reaches torch:\n" + "\n".join(chain)


@pytest.mark.parametrize("service", MODEL_FREE)
def test_the_import_graph_agrees_with_the_interpreter(service):
    """What the AST walk says, checked once for real: the service's entry module loads no torch."""
    code = (f"import sys, services.{service}.__main__; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_the_walk_sees_a_wrong_arrow(tmp_path, monkeypatch):
    """The checker itself: a library module importing a service is reported with its line."""
    fake = tmp_path / "shared" / "bad.py"
    fake.parent.mkdir()
    fake.write_text('"""x"""\nimport os\nfrom services.gateway import app\n')
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert ("services.gateway", 3) in imports(fake)
    with pytest.raises(AssertionError, match=r"shared/bad.py:3 imports services.gateway"):
        test_shared_imports_no_service_and_no_loadgen()
