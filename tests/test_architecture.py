"""The README's architecture list is the layout: every module of src/ is listed once, under its folder; a folder
imports only itself and the folders listed below it; a module imports only modules listed below it in its folder;
src/config.py, read by every folder, reads only the rules it checks flags with; and no import runs in a circle."""
import ast
import re

from conftest import ROOT

SRC = ROOT / "src"
CONFIG = "config"
# what src/config.py may read: rules that need no torch (the README's architecture section says why)
CONFIG_READS = {"cli", "errors", "flags", "accumulation", "data/types", "data/pile_mode", "data/script_mask",
                "data/jsonl", "data/instruct", "lora/settings", "train/held_out_rules", "train/state_cp/rules",
                "models/__init__"}


def architecture_block() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return text.split("## Architecture", 1)[1].split("```", 2)[1]


def listed_modules() -> list:
    """src modules in the order of the README's architecture list, top first, as paths below src/ without .py
    ("config", "models/rwkv4/model", "models/__init__")."""
    return re.findall(r"^\s*src/((?:\w+/)*\w+)\.py", architecture_block(), flags=re.M)


def listed_folders() -> list:
    """The folder headings of the README's list, top first ("hf", "train", ..., "" for the shared modules)."""
    return [folder.rstrip("/") for folder in re.findall(r"^src/((?:\w+/)*)\s", architecture_block(), flags=re.M)]


def folder_of(module: str) -> str:
    """"models/rwkv4/model" -> "models", "train/state_cp/engine" -> "train", "config" -> ""."""
    return module.split("/")[0] if "/" in module else ""


def module_of(dotted: str) -> str:
    """"src.models.rwkv4.model" -> "models/rwkv4/model"; a package ("src.models") -> its "models/__init__"."""
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
    """Every module of src/ but the empty __init__.py files that only make a folder a package."""
    return sorted(str(p.relative_to(SRC).with_suffix("")) for p in SRC.rglob("*.py")
                  if p.name != "__init__.py" or p.read_text(encoding="utf-8").strip())


def import_graph() -> dict:
    return {module: imported_src_modules(SRC / f"{module}.py") & set(source_modules()) for module in source_modules()}


def test_every_module_is_listed_once():
    listed = listed_modules()
    assert len(listed) == len(set(listed))
    assert sorted(listed) == source_modules()


def test_every_module_is_listed_under_its_folder():
    block, misplaced = architecture_block(), []
    for heading, section in zip(listed_folders(), re.split(r"^src/(?:\w+/)*\s", block, flags=re.M)[1:]):
        misplaced += [m for m in re.findall(r"^\s*src/((?:\w+/)*\w+)\.py", section, flags=re.M)
                      if folder_of(m) != heading]
    assert not misplaced, misplaced
    assert sorted(set(listed_folders())) == sorted({folder_of(m) for m in source_modules()})


def test_folders_import_only_folders_below_them():
    folders = listed_folders()
    upward = [f"src/{module}.py imports src/{imported}.py"
              for module, imported_modules in import_graph().items() if module != CONFIG
              for imported in imported_modules if imported != CONFIG
              if folders.index(folder_of(imported)) < folders.index(folder_of(module))]
    assert not upward, upward


def test_config_reads_only_the_rules_of_flags():
    assert import_graph()[CONFIG] <= CONFIG_READS, import_graph()[CONFIG] - CONFIG_READS


def test_modules_import_only_modules_below_them_in_their_folder():
    listed = listed_modules()
    upward = [f"src/{module}.py imports src/{imported}.py"
              for module, imported_modules in import_graph().items()
              for imported in imported_modules
              if folder_of(imported) == folder_of(module) and listed.index(imported) <= listed.index(module)]
    assert not upward, upward


def test_no_import_runs_in_a_circle():
    graph, done, on_path = import_graph(), set(), []

    def visit(module):
        assert module not in on_path, " -> ".join(on_path[on_path.index(module):] + [module])
        if module in done:
            return
        on_path.append(module)
        for imported in sorted(graph[module]):
            visit(imported)
        on_path.pop()
        done.add(module)

    for module in graph:
        visit(module)
