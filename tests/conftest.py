"""Shared fixtures: offline environment and tiny models built in-process (no network)."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.exists():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A nano Llama model with the ChatML tiny tokenizer, built once per test session."""
    from instructkit.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "nano", preset="nano", seed=0)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def train_cli(cfg: dict, yaml_path: Path, *extra: str) -> list[dict]:
    """Write ``cfg`` to ``yaml_path``, run ``instructkit train`` on it in a subprocess (with the tests
    folder importable, for ``test_x:reward`` functions) and return the run's metrics.jsonl records."""
    import json
    import subprocess
    import sys

    import yaml

    yaml_path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "PYTHONPATH": os.path.dirname(__file__)}
    proc = subprocess.run([sys.executable, "-m", "instructkit", "train", str(yaml_path), *extra],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(x) for x in (Path(cfg["output_dir"]) / "metrics.jsonl").read_text().splitlines()]
