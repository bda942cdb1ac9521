"""The README's architecture list is the import order: every module of src/ (packages' modules included) is listed,
and each imports only modules listed below it (so there are no cycles and nothing reaches upward)."""
import ast
import re

from conftest import ROOT

SRC = ROOT / "src"


def listed_modules() -> list:
    """src modules in the order of the README's architecture list, top first, as paths below src/ without .py
    ("config", "rwkv4/model", "rwkv4/__init__")."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = text.split("## Architecture", 1)[1].split("```", 2)[1]
    return re.findall(r"^\s*src/((?:\w+/)*\w+)\.py", block, flags=re.M)


def module_of(dotted: str) -> str:
    """"src.models.rwkv4.model" -> "rwkv4/model"; a package ("src.models.rwkv4") -> its "rwkv4/__init__"."""
    path = dotted.split(".")[1:]
    if (SRC.joinpath(*path) / "__init__.py").exists():
        path.append("__init__")
    return "/".join(path)


def imported_src_modules(path) -> set:
    """src modules a file imports, at its top or inside functions (`from src import x`, `from src.x import y`,
    `from src.pkg import submodule`, `import src.x`)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "src" and node.level == 0:
            package = module_of(node.module) if node.module != "src" else ""
            for alias in node.names:  # a name may be a submodule of the package it is imported from
                submodule = f"{node.module}.{alias.name}"
                if (SRC.joinpath(*submodule.split(".")[1:]).with_suffix(".py").exists()
                        or (SRC.joinpath(*submodule.split(".")[1:]) / "__init__.py").exists()):
                    found.add(module_of(submodule))
                elif package:
                    found.add(package)
        elif isinstance(node, ast.Import):
            found |= {module_of(alias.name) for alias in node.names if alias.name.startswith("src.")}
    return found


def source_modules() -> list:
    return sorted(str(p.relative_to(SRC).with_suffix("")) for p in SRC.rglob("*.py"))


def test_every_module_is_listed_once():
    listed = listed_modules()
    assert len(listed) == len(set(listed))
    assert sorted(listed) == source_modules()


def test_imports_only_reach_down_the_list():
    listed = listed_modules()
    upward = [f"src/{module}.py imports src/{imported}.py"
              for position, module in enumerate(listed)
              for imported in imported_src_modules(SRC / f"{module}.py")
              if imported in listed and listed.index(imported) <= position]
    assert not upward, upward
