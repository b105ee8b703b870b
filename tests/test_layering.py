"""The house rules of the source tree, checked on the code itself (README, "Layout of the code"):
imports point down the layers, no function imports a pidec module, and no module reaches for
another module's underscore names."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "pidec"
APPLICATIONS = {"training", "serving", "bench", "bulk", "demo", "cli"}
# what each application may use besides the core, causal/ and tasks/ (cli/ is the top: everything)
MAY_USE = {"demo": {"training"}, "cli": APPLICATIONS}


def modules():
    for path in sorted(SRC.rglob("*.py")):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        yield path, name, package


def pidec_imports(tree: ast.AST, package: str):
    """(node, imported module, imported names, inside a function) for every import of pidec."""
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names if a.name.split(".")[0] == "pidec"]
            if not targets:
                continue
            target, names = targets[0], []
        else:
            continue
        if target.split(".")[0] != "pidec":
            continue
        up, inside = node, False
        while up in parents:
            up = parents[up]
            inside = inside or isinstance(up, (ast.FunctionDef, ast.AsyncFunctionDef))
        yield node, target, names, inside


def unit(module: str) -> str:
    """The layer a module belongs to: an application's name, or 'core' (flat core, causal/, tasks/)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in APPLICATIONS else "core"


ALL = list(modules())


@pytest.mark.parametrize("path, name, package", ALL, ids=[m[1] for m in ALL])
def test_imports_point_down(path, name, package):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    here = unit(name)
    for node, target, names, inside in pidec_imports(tree, package):
        where = f"{path.relative_to(SRC.parent)}:{node.lineno}"
        assert not inside, f"{where}: function-local import of {target} (import at the top of the module)"
        private = [n for n in names if n.startswith("_") and not n.startswith("__")]
        assert not private, (
            f"{where}: imports {private} from {target}: make it public under a name that says what it is"
        )
        there = unit(target)
        if name == "pidec.__main__" or there in ("core", here):
            continue
        assert here != "core", f"{where}: the core imports the application {target}"
        assert there in MAY_USE.get(here, set()), f"{where}: {here}/ reaches into another application, {target}"


def test_the_rules_catch_what_they_forbid(tmp_path):
    """The checker itself: a function-local import and an underscore name are both found."""
    tree = ast.parse("from .generate import _prefill\n\ndef f():\n    from . import model\n")
    found = [(target, names, inside) for _, target, names, inside in pidec_imports(tree, "pidec")]
    assert found == [("pidec.generate", ["_prefill"], False), ("pidec", ["model"], True)]
    assert unit("pidec.serving.app") == "serving" and unit("pidec.causal.model") == "core"
