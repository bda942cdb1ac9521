"""The README's architecture list is the import order: every module of src/ is listed, and each imports only
modules listed below it (so there are no cycles and nothing reaches upward)."""
import ast
import re

from conftest import ROOT


def listed_modules() -> list:
    """src modules in the order of the README's architecture list, top first."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = text.split("## Architecture", 1)[1].split("```", 2)[1]
    return re.findall(r"^src/(\w+)\.py", block, flags=re.M)


def imported_src_modules(path) -> set:
    """src modules a file imports, at its top or inside functions (`from src import x`, `from src.x import y`)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module == "src":
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("src."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {alias.name.split(".")[1] for alias in node.names if alias.name.startswith("src.")}
    return found


def test_every_module_is_listed_once():
    listed = listed_modules()
    assert len(listed) == len(set(listed))
    assert sorted(listed) == sorted(p.stem for p in (ROOT / "src").glob("*.py"))


def test_imports_only_reach_down_the_list():
    listed = listed_modules()
    upward = [f"src/{module}.py imports src/{imported}.py"
              for position, module in enumerate(listed)
              for imported in imported_src_modules(ROOT / "src" / f"{module}.py")
              if imported in listed and listed.index(imported) <= position]
    assert not upward, upward
