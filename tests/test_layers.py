"""The layers of docs/architecture.md, as the imports have them: nothing imports upward.

Read from the source (every import statement, also inside functions), so a
shortcut across layers fails here before it spreads.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Lowest first, as docs/architecture.md lists them bottom up. A module may import its own layer or lower ones.
LAYERS = [
    ("vml", "vml.errors", "vml.names", "vml.files", "vml.times", "vml.progress"),
    ("vml.repo.objects",),
    ("vml.layout",),
    ("vml.repo",),
    ("vml.control",),
    ("vml.remotes",),
    ("vml.entries",),
    ("vml.config", "vml.trust"),
    ("vml.vms",),
    ("vml.envs",),
    ("vml.view",),
    ("vml.home", "vml.overview"),
    ("vml.sites",),
    ("vml.web",),
    ("vml.cli", "vml.__main__"),
    ("vmlfs",),
]
# The mount package sits above the CLI (it serves the library's view); `vml mount` and
# the web page's Mount start it, so these two load it, and nothing else in vml does.
MOUNTERS = {"vml.cli.areas", "vml.cli.deploy", "vml.web.mounting"}


def layer(module: str) -> int:
    """The layer of ``module``: the longest prefix named in LAYERS decides."""
    best, rank = "", None
    for i, names in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and len(name) > len(best):
                best, rank = name, i
    assert rank is not None, f"{module} is in no layer of docs/architecture.md"
    return rank


def modules():
    for package in ("vml", "vmlfs"):
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            yield name, path, path.name == "__init__.py"


def imports(name: str, path: Path, is_package: bool):
    """(imported module, line) for every import of vml or vmlfs in the file."""
    here = name.split(".") if is_package else name.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = here[: len(here) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            found = [f"{module}.{a.name}" for a in node.names]  # a submodule or a name in module: same layer
        else:
            continue
        for target in found:
            if target.split(".")[0] in ("vml", "vmlfs"):
                yield target, node.lineno


def test_no_module_imports_a_layer_above_its_own():
    upward = [
        f"{path.relative_to(ROOT)}:{line} imports {target}"
        for name, path, is_package in modules()
        for target, line in imports(name, path, is_package)
        if layer(target) > layer(name) and not (name in MOUNTERS and target.startswith("vmlfs.daemon"))
    ]
    assert upward == []


def test_only_the_mount_commands_load_the_mount_package():
    loaders = {
        name
        for name, path, is_package in modules()
        if name.startswith("vml") and not name.startswith("vmlfs")
        for target, _ in imports(name, path, is_package)
        if target.startswith("vmlfs")
    }
    assert loaders == MOUNTERS


def test_no_module_is_over_500_lines():
    long = {str(p.relative_to(ROOT)): n for _, p, _ in modules() if (n := len(p.read_text().splitlines())) > 500}
    assert long == {}


def test_the_readme_and_the_architecture_name_every_layer():
    text = (ROOT / "README.md").read_text() + (ROOT / "docs" / "architecture.md").read_text()
    folders = sorted(p.name for p in (ROOT / "vml").iterdir() if (p / "__init__.py").exists())
    assert folders == ["cli", "entries", "envs", "remotes", "repo", "sites", "view", "vms", "web"]
    assert [f for f in folders if f"`{f}/`" not in text and f"`vml/{f}/`" not in text] == []


def _store_format(node: ast.AST) -> bool:
    """``store.format`` or ``x.store.format``: a repository's format (a catalog's or an image's is another)."""
    if not (isinstance(node, ast.Attribute) and node.attr == "format"):
        return False
    owner = node.value
    return (isinstance(owner, ast.Name) and owner.id == "store") or (
        isinstance(owner, ast.Attribute) and owner.attr == "store"
    )


def _format_leaks(tree: ast.AST) -> list[tuple[int, str]]:
    """Where a module tests the repository format or spells a pack, index or pack set name itself."""
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            if any(_store_format(s) for s in sides) and any(
                isinstance(s, ast.Constant) and isinstance(s.value, int) for s in sides
            ):
                found.append((node.lineno, "tests the repository format"))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            if any(part in node.value for part in ("packs/", "packsets/", ".idx")):
                found.append((node.lineno, f"spells a pack file's name ({node.value!r})"))
        elif isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id in ("MAX_OBJECT", "MAX_FRAME") for t in node.targets
        ):
            found.append((node.lineno, "defines the largest frame again"))
    return found


def test_no_module_outside_vml_repo_reads_the_format_or_builds_a_name_of_it():
    """The format stays in vml/repo/: vml.repo.paths names its files, Store says what it does
    (packs_chunks, pack_writer), vml.repo.objects bounds a frame."""
    leaks = []
    for name, path, _ in modules():
        if not name.startswith("vml.repo."):
            leaks += [
                f"{path.relative_to(ROOT)}:{line}: {what}" for line, what in _format_leaks(ast.parse(path.read_text()))
            ]
    assert not leaks, "\n".join(leaks)
    sample = "if store.format == 2:\n    p = root / 'packs/ab'\nMAX_OBJECT = 1\n"
    assert len(_format_leaks(ast.parse(sample))) == 3  # the check itself sees each kind
