"""The repository's shape: the package's tiers import only downward, no modules import each other in
a circle, no file of code or class is long, and every link in the README and docs/ leads somewhere
that exists."""
import ast
import os
import re
from pathlib import Path

import pytest

from conftest import ROOT

# Who may import whom inside `serving`: each part and the parts below it. wire/ is the floor;
# the shared modules beside it; then the two tiers, which never import each other; rollout/
# starts and drives the model side.
LAYERS = {
    "serving.text": set(), "serving.errors": set(), "serving.redis_urls": {"serving.text"},
    "serving.wire": {"serving.text", "serving.errors", "serving.redis_urls"},
    "serving.images": {"serving.errors"},
    "serving.metrics": {"serving.wire", "serving.text", "serving.errors"},
    "serving.web": {"serving.wire", "serving.images", "serving.metrics", "serving.text",
                    "serving.errors"},
    "serving.model": {"serving.wire", "serving.images", "serving.metrics", "serving.text",
                      "serving.errors"},
    "serving.rollout": {"serving.model", "serving.wire", "serving.metrics", "serving.text",
                        "serving.errors"},
}
MAX_LINES = 420
MAX_CLASS_LINES = 125


def modules():
    for path in sorted((ROOT / "serving").rglob("*.py")):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        yield name.removesuffix(".__init__"), path


def part_of(module):
    return next((part for part in sorted(LAYERS, key=len, reverse=True)
                 if module == part or module.startswith(part + ".")), "serving")


def imported(path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module


@pytest.mark.parametrize("module, path", list(modules()),
                         ids=[module for module, _ in modules()])
def test_a_module_imports_its_own_part_and_the_parts_below_only(module, path):
    part = part_of(module)
    allowed = LAYERS.get(part, set(LAYERS)) | {part}
    wrong = {name for name in imported(path) if name.startswith("serving.")
             and part_of(name) not in allowed}
    assert not wrong, f"{module} ({part}) imports {wrong}"


def source_files():
    """The code outside tests/: the package, the entry points, bench/, deploy/, examples/."""
    found = []
    for folder, subfolders, files in os.walk(ROOT):
        # Not tests/, nor hidden folders (virtualenvs, caches, .git).
        subfolders[:] = [name for name in subfolders if not name.startswith(".")
                         and not (folder == str(ROOT) and name == "tests")]
        found += [Path(folder, name) for name in files
                  if Path(name).suffix in (".py", ".js", ".lua", ".sh")]
    return sorted(found)


@pytest.mark.parametrize("path", list(source_files()), ids=lambda path: str(path.relative_to(ROOT)))
def test_no_file_or_class_is_long(path):
    assert len(path.read_text().splitlines()) <= MAX_LINES
    if path.suffix == ".py":
        long_classes = {node.name: node.end_lineno - node.lineno + 1
                        for node in ast.walk(ast.parse(path.read_text()))
                        if isinstance(node, ast.ClassDef)
                        and node.end_lineno - node.lineno + 1 > MAX_CLASS_LINES}
        assert not long_classes


def module_imports(path, known):
    """The package's modules that a module imports (anywhere in it, functions too)."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names if alias.name in known)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                name = f"{node.module}.{alias.name}"
                yield name if name in known else node.module


def test_no_modules_import_each_other_in_a_circle():
    paths = dict(modules())
    graph = {module: set(module_imports(path, paths)) & set(paths) - {module}
             for module, path in paths.items()}
    done, trail = set(), []

    def circle_from(module):
        if module in trail:
            return trail[trail.index(module):] + [module]
        if module in done:
            return None
        trail.append(module)
        found = next(filter(None, map(circle_from, sorted(graph[module]))), None)
        trail.pop()
        done.add(module)
        return found

    circles = list(filter(None, map(circle_from, sorted(graph))))
    assert not circles, " -> ".join(circles[0])


def test_no_top_level_entry_point_is_imported_by_the_package():
    entry_points = {"run_keras_server", "helpers", "simple_request", "stress_test"}
    for module, path in modules():
        assert not set(imported(path)) & entry_points, module


def anchors(path):
    """GitHub's anchors of a Markdown file's headings."""
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.M | re.S)
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
            for heading in re.findall(r"^#{1,6} (.+)$", text, re.M)}


DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")),
             ROOT / "bench" / "README.md", ROOT / "bench" / "results" / "README.md",
             ROOT / "deploy" / "README.md"]


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda path: str(path.relative_to(ROOT)))
def test_every_link_in_the_docs_resolves(document):
    text = re.sub(r"^```.*?^```", "", document.read_text(), flags=re.M | re.S)
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue  # a web address: not checked offline
        file, _, anchor = target.partition("#")
        path = (document.parent / file).resolve() if file else document
        if not path.exists() or anchor and path.suffix == ".md" and anchor not in anchors(path):
            broken.append(target)
    assert not broken, f"{document.name}: {broken}"


def test_the_readme_is_a_guide_of_about_300_lines():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 300
