"""The project's shape (README, "Layout"): commands at the root on top of the `clipseg` library, layers that point
one way, no import cycles, modules readable in one sitting, no reference to files outside the repository."""

from __future__ import annotations

import ast
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
COMMANDS = {"train", "score", "failure_test", "predict", "app", "export", "bench"}
ROOT_MODULES = COMMANDS | {"model", "dataset"}  # the two modules users import by name
MAX_LINES = 600


def project_modules() -> dict[str, Path]:
    """Dotted module name -> file, for the root modules and the `clipseg` package."""
    modules = {path.stem: path for path in REPO.glob("*.py")}
    for path in (REPO / "clipseg").rglob("*.py"):
        parts = path.relative_to(REPO).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules a file imports anywhere in it (module level, functions, TYPE_CHECKING blocks)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {name for name in names if name in modules}
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports_of(path, modules) - {name} for name, path in modules.items()}


def test_the_root_holds_only_the_commands_model_and_dataset():
    assert {path.stem for path in REPO.glob("*.py")} == ROOT_MODULES


def test_the_library_never_imports_a_command_and_commands_never_import_each_other(graph):
    wrong = {(module, imported) for module, imports in graph.items() for imported in imports & COMMANDS}
    assert not wrong, f"modules importing a command: {sorted(wrong)}"


def test_there_is_no_import_cycle(graph):
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for imported in sorted(graph[module]):
            if state.get(imported) == "open":
                cycle = path[path.index(imported) :] + [imported]
                pytest.fail(f"import cycle: {' -> '.join(cycle)}")
            if imported not in state:
                visit(imported, [*path, imported])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_a_package_init_imports_nothing_of_the_project(graph):
    packages = [name for name, path in project_modules().items() if path.name == "__init__.py"]
    assert all(not graph[name] for name in packages), {name: graph[name] for name in packages if graph[name]}


def test_every_module_is_readable_in_one_sitting_and_says_what_it_owns():
    texts = {path.relative_to(REPO): path.read_text() for path in project_modules().values()}
    long = {str(path): len(text.splitlines()) for path, text in texts.items() if len(text.splitlines()) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"
    undocumented = [str(path) for path, text in texts.items() if not ast.get_docstring(ast.parse(text))]
    assert not undocumented, f"modules without an opening docstring: {undocumented}"


def test_nothing_cites_a_file_outside_the_repository():
    """The original's rules are cited by their source (repository, file, line) in docstrings and docs/original.md;
    no file names a reference document a reader of the project does not have."""
    word = "SP" + "EC"  # spelled apart so that this file does not match itself
    listed = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True)
    files = [REPO / name for name in listed.stdout.splitlines()] if listed.returncode == 0 else REPO.rglob("*.py")
    hits = []
    for path in files:
        if path.suffix in (".py", ".md", ".txt", ".toml", ".cfg") or path.name in ("Makefile", "run"):
            hits += [f"{path.relative_to(REPO)}:{n}" for n, line in enumerate(path.read_text().splitlines(), 1)
                     if word in line]  # fmt: skip
    assert not hits, hits


def test_the_readme_layout_names_every_file():
    """README's "Layout" tree has a line for each command, root module and library file (packages by folder)."""
    readme = (REPO / "README.md").read_text()
    tree = readme[readme.index("## Layout") :].split("```")[1]
    listed = {line.split()[0] for line in tree.splitlines() if line.strip()}
    expected = {f"{name}.py" for name in ROOT_MODULES}
    for path in (REPO / "clipseg").iterdir():
        if path.suffix == ".py" and path.name != "__init__.py":
            expected.add(path.name)
        elif path.is_dir() and (path / "__init__.py").is_file():
            expected.add(f"{path.name}/")
    assert expected <= listed, f"add to README's Layout: {sorted(expected - listed)}"
