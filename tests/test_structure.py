"""The route through the code, kept: a model file loads only what the model is made of, imports run downhill and
shallow, lib never imports a script, one module reads and writes checkpoints, no function outgrows a screen, and
README stays short enough to read at once."""
import ast
import functools
import glob
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

SCRIPTS = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(REPO, "*.py")))
LIB = sorted("lib." + os.path.basename(p)[:-3] for p in glob.glob(os.path.join(REPO, "lib", "*.py"))
             if not p.endswith("__init__.py")) + ["lib"]
# what a model is made of; the loop, the run folder, the report, the pages, DDP and signals are not
MODEL_PARTS = {"lib", "lib.layers", "lib.quantize", "lib.sample", "lib.kernels", "lib.teams"}
MAX_DEPTH = 7  # modules in the longest import-time chain
MAX_LINES = 60  # per function
README_LINES = 170


def path_of(module):
    return os.path.join(REPO, "lib", "__init__.py") if module == "lib" else \
        os.path.join(REPO, *module.split(".")) + ".py"


def imported(node, module_names):
    """The repository's modules an import statement names."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    elif node.level == 0 and node.module:
        names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    else:
        return set()
    return {n for n in names if n in module_names}


def top_level_statements(body):
    """The statements that run when a module is imported: not function bodies (class bodies do run)."""
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        yield node
        for field in ("body", "orelse", "finalbody", "handlers"):
            yield from top_level_statements(getattr(node, field, []) or [])


def tree(module):
    return ast.parse(open(path_of(module)).read(), path_of(module))


@functools.cache
def import_graph():
    """{module: the repository's modules it imports when it is imported}, from the source (Python's ast)."""
    names = set(SCRIPTS) | set(LIB)
    graph = {}
    for module in names:
        edges = set()
        for node in top_level_statements(tree(module).body):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                edges |= imported(node, names)
        graph[module] = edges - {module}
    return graph


def longest_chain(graph):
    @functools.cache
    def chain(module, seen=()):
        assert module not in seen, f"import cycle: {' -> '.join(seen + (module,))}"
        below = [chain(m, seen + (module,)) for m in sorted(graph[module])]
        return (module,) + max(below, key=len, default=())
    return max((chain(m) for m in graph), key=len)


def test_imports_run_downhill_at_most_seven_deep():
    longest = longest_chain(import_graph())
    assert len(longest) <= MAX_DEPTH, " -> ".join(longest)
    assert len(longest) >= 4  # the measure sees real chains (a script -> lib.x -> lib.y -> lib)


def test_lib_never_imports_a_script():
    for module in LIB:
        for node in ast.walk(tree(module)):  # function bodies too, and importlib
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                assert not imported(node, set(SCRIPTS)), f"{module} imports a script at line {node.lineno}"
            if isinstance(node, ast.Attribute) and node.attr == "import_module":
                raise AssertionError(f"{module} imports by name at line {node.lineno}")


@pytest.mark.parametrize("script", ["two_tier", "three_tier", "baseline"])
def test_a_model_file_loads_only_the_model(script):
    """In a fresh interpreter, `import two_tier` loads torch and the model's own pieces, none of the training."""
    code = f"import json, sys, {script}; print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] == 'lib')))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    loaded = set(json.loads(out))
    assert "lib.layers" in loaded and "lib.sample" in loaded  # the check sees what is loaded
    assert loaded <= MODEL_PARTS, sorted(loaded - MODEL_PARTS)


def test_one_module_writes_and_reads_checkpoints_and_one_function_reads_settings_json():
    for module in set(LIB) | set(SCRIPTS):
        text = open(path_of(module)).read()
        if module != "lib.checkpoint" and not module.startswith("test"):
            assert "torch.save(" not in text and "torch.load(" not in text, module
        if module != "lib.run":
            assert not any('"settings.json")) as' in line for line in text.splitlines()), module


RUN_NAMES = {"settings.json", "log.txt", "metrics.jsonl", "metrics_set_aside.jsonl", "checkpoints", "best.pt", "samples",
             "tensorboard", "generated", ".lock"}


def test_every_path_below_a_run_is_joined_in_lib_run():
    """lib/run.py's Run joins them; every other module asks it (run.checkpoints, run.sample_paths(...))."""
    joined = []
    for module in set(LIB) | set(SCRIPTS):
        for node in ast.walk(tree(module)):
            if isinstance(node, ast.Call) and ast.unparse(node.func) in ("os.path.join", "join"):
                names = {a.value for a in node.args if isinstance(a, ast.Constant)} & RUN_NAMES
                if names:
                    joined.append(f"{module} line {node.lineno}: {sorted(names)}")
    assert [j for j in joined if not j.startswith("lib.run ")] == []
    assert len(joined) >= 5  # the check sees lib/run.py's own joins


def test_no_function_over_sixty_lines():
    long = []
    for module in set(LIB) | set(SCRIPTS):
        for node in ast.walk(tree(module)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_LINES:
                    long.append(f"{module}.{node.name}: {lines} lines")
    assert not long


def test_readme_reads_at_once():
    with open(os.path.join(REPO, "README.md")) as f:
        assert len(f.read().splitlines()) <= README_LINES
