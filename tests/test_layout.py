"""Where things are (README "Where things are"): each package imports only what is below it.

``cluster/`` is the shared core of every process: it must not import a service
(``node``, ``router``), the command line (``pushctl``) or the load tests, not
even inside a function, or the layers stop meaning anything.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

ALLOWED = {
    "cluster": {"cluster"},
    "node": {"cluster", "node"},
    "router": {"cluster", "router"},
    "pushctl": {"cluster", "node", "router", "pushctl"},
}
PROJECT_PACKAGES = {"cluster", "node", "router", "pushctl", "loadtest"}


def project_imports(path: Path) -> set[str]:
    """The project packages a module imports, anywhere in it."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found.update(top for name in names if (top := name.partition(".")[0]) in PROJECT_PACKAGES)
    return found


def test_each_package_imports_only_the_layers_below_it() -> None:
    wrong = []
    for package, allowed in ALLOWED.items():
        for module in sorted((ROOT / package).rglob("*.py")):
            for imported in sorted(project_imports(module) - allowed):
                wrong.append(f"{module.relative_to(ROOT)} imports {imported}")
    assert not wrong, "\n".join(wrong)


def test_the_layout_check_sees_an_upward_import(tmp_path: Path) -> None:
    module = tmp_path / "upward.py"
    module.write_text("def late():\n    from node.app import run\n    import router.proxy\n")
    assert project_imports(module) == {"node", "router"}
