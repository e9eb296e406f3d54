"""House rules that code review would otherwise have to catch: layering, docstrings, public surface."""

import ast
import inspect
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("scale_common", "cka_scale", "msun_builder")
MODULES = sorted(p for pkg in PACKAGES for p in (ROOT / pkg).glob("*.py"))


def _module_name(path):
    return path.parent.name if path.stem == "__init__" else f"{path.parent.name}.{path.stem}"


def _imports(tree, known):
    """Modules of ours imported anywhere in ``tree`` (function bodies too), except under ``if TYPE_CHECKING``."""
    found = set()

    def visit(node):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)  # `from pkg import module`
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return {name for name in found if name in known}


def import_graph():
    """Module -> the modules of ours it imports."""
    known = {_module_name(p) for p in MODULES}
    return {_module_name(p): _imports(ast.parse(p.read_text()), known) - {_module_name(p)} for p in MODULES}


def find_cycle(graph):
    """One import cycle as a list of modules, or None."""
    state, stack = {}, []

    def dfs(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return [*stack[stack.index(nxt):], nxt]
            if nxt not in state and (found := dfs(nxt)):
                return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (found := dfs(node)):
            return found
    return None


def test_the_packages_have_no_import_cycle():
    assert find_cycle(import_graph()) is None, " -> ".join(find_cycle(import_graph()))


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_layers_point_one_way_and_no_command_line_borrows_from_another():
    for module, imported in import_graph().items():
        package = module.split(".")[0]
        if package == "scale_common":
            assert not {m for m in imported if not m.startswith("scale_common")}, f"{module} imports {imported}"
        if package == "cka_scale":
            assert not {m for m in imported if m.startswith("msun_builder")}, f"{module} imports {imported}"
        if package == "msun_builder":
            assert "cka_scale.cli" not in imported and "cka_scale.__main__" not in imported, module
        if package != "cka_scale":
            assert not {m for m in imported if m.startswith("cka_scale.cli")}, module


def test_the_graph_sees_lazy_imports():
    assert "msun_builder.msun" in import_graph()["msun_builder.methods"]  # imported inside a function there


@pytest.mark.parametrize("command", ["cka-scale", "msun-build", "msun-eval"])
def test_help_answers_at_once_without_torch(command):
    entry = {"cka-scale": "cka_scale.cli:main", "msun-build": "msun_builder.cli:build_main",
             "msun-eval": "msun_builder.cli:eval_main"}[command]
    module, func = entry.split(":")
    code = (f"import sys, time; t = time.perf_counter(); import {module}\n"
            f"try:\n    {module}.{func}(['--help'])\nexcept SystemExit:\n    pass\n"
            "heavy = sorted(m for m in ('torch', 'timm', 'torchvision', 'numpy', 'matplotlib') if m in sys.modules)\n"
            "print(time.perf_counter() - t, heavy, file=sys.stderr)")
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    wall = time.perf_counter() - started
    heavy = done.stderr.strip().split(" ", 1)[1]
    assert "usage:" in done.stdout and heavy == "[]", done.stderr
    assert wall < 1.0, f"{command} --help took {wall:.2f} s"


@pytest.mark.parametrize("argv", [["msun-build", "--version"], ["cka-scale", "analyze"],
                                  ["msun-build", "--epochs", "x"]])
def test_version_and_usage_errors_without_torch(argv):
    module = "cka_scale.cli:main" if argv[0] == "cka-scale" else "msun_builder.cli:build_main"
    mod, func = module.split(":")
    code = (f"import sys; import {mod}\nrc = {mod}.{func}({argv[1:]!r})\n"
            "print(rc, 'torch' in sys.modules, file=sys.stderr)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    rc, torch_loaded = done.stderr.strip().splitlines()[-1].split()
    assert torch_loaded == "False" and rc in ("0", "2"), done.stderr


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


@pytest.mark.parametrize("package", PACKAGES)
def test_public_names_exist_and_are_documented(package):
    module = __import__(package)
    for name in module.__all__:
        obj = getattr(module, name)
        if inspect.isfunction(obj) or inspect.isclass(obj):
            assert inspect.getdoc(obj), f"{package}.{name} has no docstring"
