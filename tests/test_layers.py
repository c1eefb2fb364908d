"""The package's layers, checked from its imports (read from the source, nothing is run).

The rule, bottom to top: `files` and `visualize` are leaves; `model` (networks, decoding, model
folders) imports nothing above it; `data` (datasets, images, feature cache) builds on `model`;
`evaluation` (metrics, grounding, focus trials) on `model` and `data`; `training` and `serving`
sit side by side on top of those and never import each other; `cli` may import anything.
Imports only made for type checkers (`if TYPE_CHECKING:`) do not count: they run nothing.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "captioner"
BELOW = {
    "files": set(),
    "visualize": set(),
    "model": {"files"},
    "data": {"files", "model"},
    "evaluation": {"files", "model", "data"},
    "training": {"files", "model", "data", "evaluation"},
    "serving": {"files", "visualize", "model", "data", "evaluation"},
}


def layer(module: str) -> str:
    """captioner.model.decoder -> model; captioner.files -> files."""
    return module.split(".")[1]


def runtime_imports(path: Path) -> set[str]:
    """Modules of captioner that `path` imports when it runs (at the top or inside functions)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    typing_only = {
        id(n)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and ast.unparse(node.test).endswith("TYPE_CHECKING")
        for n in ast.walk(node)
    }
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return {name for name in found if name.startswith("captioner.") and name.count(".") >= 1}


def modules() -> dict[str, Path]:
    return {
        ".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts): p
        for p in PACKAGE.rglob("*.py")
        if p.name not in ("__init__.py", "__main__.py")
    }


def test_every_module_imports_only_its_own_layer_and_the_layers_below():
    wrong = []
    for name, path in sorted(modules().items()):
        own = layer(name)
        if own == "cli":
            continue
        assert own in BELOW, f"{name}: a layer the rule does not know; add it to BELOW"
        for target in runtime_imports(path):
            if target.split(".")[1] not in {*BELOW, "cli"}:
                continue  # captioner.weights and the like: data, not code
            if layer(target) != own and layer(target) not in BELOW[own]:
                wrong.append(f"{name} imports {target}")
    assert not wrong, "imports against the layer rule:\n" + "\n".join(sorted(set(wrong)))


def test_the_records_module_and_the_command_line_help_load_no_torch():
    code = (
        "import sys, captioner.serving.records, captioner.cli.main as m\n"
        "try:\n    m.main(['--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = sorted({'torch', 'timm', 'gradio'} & set(sys.modules))\n"
        "assert not heavy, heavy\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
