"""House rules that code review would otherwise have to catch: layering, docstrings, public surface."""

import ast
import inspect
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULES = sorted(p for pkg in ("cka_scale", "msun_builder") for p in (ROOT / pkg).glob("*.py"))


def test_cka_scale_never_imports_msun_builder():
    names = [f"cka_scale.{p.stem}" for p in MODULES if p.parent.name == "cka_scale" and p.stem != "__main__"]
    code = "import importlib, sys\n" + "".join(f"importlib.import_module({n!r})\n" for n in names) + \
        "print(any(m.startswith('msun_builder') for m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


@pytest.mark.parametrize("path", MODULES, ids=[f"{p.parent.name}/{p.name}" for p in MODULES])
def test_every_module_says_what_it_is_and_documents_its_public_functions(path):
    tree = ast.parse(path.read_text())
    doc = ast.get_docstring(tree)
    assert doc and doc.splitlines()[0].strip(), f"{path} has no one-line module docstring"
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.ClassDef) and not node.name.startswith("_"):
            assert ast.get_docstring(node), f"{path}:{node.lineno} {node.name} has no docstring"
            if isinstance(node, ast.FunctionDef):
                args = [a for a in node.args.args + node.args.kwonlyargs if a.arg not in ("self", "cls")]
                assert node.returns is not None and all(a.annotation is not None for a in args), \
                    f"{path}:{node.lineno} {node.name} is not fully typed"


@pytest.mark.parametrize("package", ["cka_scale", "msun_builder"])
def test_public_names_exist_and_are_documented(package):
    module = __import__(package)
    for name in module.__all__:
        obj = getattr(module, name)
        if inspect.isfunction(obj) or inspect.isclass(obj):
            assert inspect.getdoc(obj), f"{package}.{name} has no docstring"
