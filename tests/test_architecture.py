"""Keep the import direction of DESIGN.md true: cheap AST checks over the package."""

import ast
import re
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "instructkit"
TRAINING = ("instructkit.loop", "instructkit.losses", "instructkit.methods")


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def files(sub: str = "") -> list[Path]:
    return sorted((PKG / sub).rglob("*.py"))


def test_data_never_imports_training_code():
    for f in files("data"):
        bad = [m for m in imports_of(f) if m.startswith(TRAINING) or m == "instructkit.models"]
        assert not bad, f"{f.name} imports {bad}"


def test_losses_import_only_torch():
    mods = imports_of(PKG / "losses.py")
    assert all(m == "__future__" or m.split(".")[0] == "torch" for m in mods), mods


def test_methods_do_not_import_each_other():
    for f in files("methods"):
        others = [m for m in imports_of(f) if m.startswith("instructkit.methods")]
        assert not others, f"{f.name} imports {others}"


def test_one_backward_call():
    hits = [f.relative_to(PKG) for f in files() if re.search(r"\.backward\(", f.read_text())]
    assert [str(h) for h in hits] == ["loop.py"], hits


def test_no_utils_module_and_files_stay_readable():
    assert not [f for f in files() if f.stem == "utils"]
    long = [(f.name, n) for f in files() if (n := len(f.read_text().splitlines())) > 800]
    assert not long, long


def test_torch_load_is_weights_only_and_no_remote_code_default():
    for f in files():
        src = f.read_text()
        for m in re.finditer(r"torch\.load\(([^)]*)\)", src):
            assert "weights_only=True" in m.group(1), f"{f.name}: {m.group(0)}"
        assert "trust_remote_code=True" not in src, f.name
        assert "yaml.load(" not in src, f.name
