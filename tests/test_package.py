"""The package as a whole: no import circle among its modules, and no names that are not there."""

import ast
from pathlib import Path

import pytest

import g2sd_hf


PACKAGE = Path(g2sd_hf.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Each `g2sd_hf` module -> the `g2sd_hf` modules it imports, anywhere in its code (a function's import too: an
    import moved into a function to dodge a circle is still a circle in the design)."""
    modules = {module_name(path): path for path in PACKAGE.rglob("*.py") if "evaluate_modules" not in path.parts}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                candidates = [target, *(f"{target}.{alias.name}" for alias in node.names)]
            elif isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names]
            else:
                continue
            imported |= {candidate for candidate in candidates if candidate in modules and candidate != name}
        graph[name] = imported
    return graph


def find_circle(graph: dict[str, set[str]]) -> list[str] | None:
    state, path = {}, []

    def visit(module):
        state[module], _ = "open", path.append(module)
        for other in sorted(graph[module]):
            if state.get(other) == "open":
                return path[path.index(other) :] + [other]
            if other not in state and (circle := visit(other)):
                return circle
        state[module], _ = "done", path.pop()
        return None

    for module in sorted(graph):
        if module not in state and (circle := visit(module)):
            return circle
    return None


def test_no_module_of_the_package_imports_itself_through_others():
    graph = import_graph()
    assert {"g2sd_hf.data", "g2sd_hf.trainer", "g2sd_hf.scripts.run"} <= graph.keys()
    assert "g2sd_hf.metrics" in graph["g2sd_hf.data"]  # the walk sees imports
    assert find_circle(graph) is None, " -> ".join(find_circle(graph))


def test_the_circle_finder_finds_a_circle():
    assert find_circle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_circle({"a": {"b"}, "b": set()}) is None


def test_unknown_names_are_attribute_errors_and_old_names_are_gone():
    with pytest.raises(AttributeError, match="has no attribute 'NoSuchThing'"):
        g2sd_hf.NoSuchThing  # noqa: B018
    with pytest.raises(AttributeError):
        g2sd_hf.GenericDistillationConfig  # noqa: B018  (renamed GenericDistillationArguments; see docs/changes.md)
    assert g2sd_hf.export_to_transformers.__module__ == "g2sd_hf.export"
