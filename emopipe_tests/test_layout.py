"""The code's layout as rules a reader can rely on: no import cycle among emopipe's modules (imports
inside functions included: they only hide a cycle), and no module importing another's private name."""

import ast
from pathlib import Path

import emopipe

ROOT = Path(emopipe.__file__).parent


def _modules() -> dict[str, Path]:
    found = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imports(tree: ast.Module, modules: dict[str, Path]):
    """(imported module, names) for every emopipe import, skipping `if TYPE_CHECKING:` blocks (never run)."""
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for n in ast.walk(node)}
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in modules:
                    yield alias.name, []
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("emopipe"):
            names = [a.name for a in node.names]
            submodules = [f"{node.module}.{n}" for n in names if f"{node.module}.{n}" in modules]
            yield from ((m, []) for m in submodules)
            if len(submodules) < len(names):
                yield node.module, [n for n in names if f"{node.module}.{n}" not in modules]


def _graph() -> tuple[dict[str, set[str]], list[str]]:
    modules = _modules()
    edges, private = {}, []
    for name, path in modules.items():
        edges[name] = set()
        for target, names in _imports(ast.parse(path.read_text()), modules):
            edges[name].add(target)
            private += [f"{name} imports {target}.{n}" for n in names if n.startswith("_") and target != name]
    return edges, private


def test_no_import_cycle():
    edges, _ = _graph()
    state, cycles = {}, []

    def visit(node, path):
        state[node] = "open"
        for target in sorted(edges.get(node, ())):
            if state.get(target) == "open":
                cycles.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in state:
                visit(target, path + [target])
        state[node] = "done"

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert edges["emopipe.definitions"], "the import walk found nothing"
    assert not cycles, cycles


def test_no_private_name_crosses_a_module():
    _, private = _graph()
    assert not private, private


def test_loading_the_definitions_imports_no_model_library():
    """Every Dagster step process loads the definitions first: torch, timm, EasyOCR, onnxruntime and
    rapidocr (PP-OCR), OpenCV, captum, Ray and scipy (stats, fft and sparse: ~0.8 CPU-s together) are imported
    inside the steps that use them, so a DuckDB-only step starts in about a second."""
    import subprocess
    import sys

    libraries = ('torch', 'torchvision', 'timm', 'easyocr', 'captum', 'ray', 'onnxruntime', 'rapidocr_onnxruntime', 'cv2', 'openvino',
                 'scipy')
    code = f"import sys, emopipe.definitions; print(' '.join(m for m in {libraries!r} if m in sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True).stdout
    assert loaded.strip() == "", f"importing emopipe.definitions loads {loaded.strip()}"
