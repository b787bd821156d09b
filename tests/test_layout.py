"""The shape of the house (docs/design.md, "Layout of common/"): every module of common/ opens with what it
holds, and no script imports another script or a private name of common/."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPTS = sorted(path.stem for path in ROOT.glob("*.py"))
MODULES = sorted(path for path in (ROOT / "common").glob("*.py") if path.name != "__init__.py")


def imports(path):
    """(module, name) of every `from X import name` and (module, None) of every `import X` in a file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            found += [(node.module, alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(alias.name, None) for alias in node.names]
    return found


@pytest.mark.parametrize("path", MODULES, ids=lambda path: path.name)
def test_every_module_of_common_opens_with_what_it_holds(path):
    docstring = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
    assert docstring and len(docstring.split("\n")[0]) > 20, f"{path.name} does not say what it holds"


def test_no_script_imports_another_script_or_a_private_name_of_common():
    files = [ROOT / f"{name}.py" for name in SCRIPTS] + sorted((ROOT / "benchmarks").glob("*.py")) + MODULES
    wrong = []
    for path in files:
        for module, name in imports(path):
            if module.split(".")[0] in SCRIPTS and path.parent == ROOT:
                wrong.append(f"{path.name} imports the script {module}")
            if module.startswith("common") and name and name.startswith("_"):
                wrong.append(f"{path.relative_to(ROOT)} imports {module}.{name}")
    assert not wrong, wrong
