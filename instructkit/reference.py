"""Reference-model log-probabilities for DPO-style and KTO training, without a second model in memory.

Two modes (``preference.reference``):

- ``precompute`` (default): before training, one no-grad pass of the *initial* model over every
  train and eval sequence; the per-sequence sums are cached on disk under a key made of the model's
  identity (config and weight file names, sizes and modification times; for a hub id, the commit its
  revision resolves to in the local Hugging Face cache) and the exact token ids and
  loss masks (which reflect data, template and truncation). A second run on the same model and data
  loads them instantly. During training the reference is a table lookup.
- ``live``: the reference is computed every step: the same weights with LoRA adapters disabled, or,
  for full fine-tuning, a frozen copy of the initial model (twice the weight memory).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import sys
from contextlib import nullcontext
from pathlib import Path

import torch

from instructkit.models import unit_logps


def hub_commit(repo_id: str, revision: str | None) -> str | None:
    """The commit that ``revision`` (a branch, tag or hash; None = main) of a hub model resolves to in the
    local Hugging Face cache, or None when the model is not cached there. No network access."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    except Exception:  # not a valid repo id, or no huggingface_hub: the name is all we know
        return None
    return Path(found).parent.name if isinstance(found, str) else None  # .../snapshots/<commit>/config.json


def _model_fingerprint(name_or_path: str, revision: str | None) -> dict:
    from instructkit.gguf import resolve_model_path

    # A GGUF file is identified by its converted folder, whose name carries the file's content hash.
    path = Path(resolve_model_path(name_or_path))
    if not path.is_dir():
        # A hub id: a branch such as "main" moves when the repo is updated, so the commit it resolves to in the
        # local cache is part of the identity (a cache made from the old weights is then not reused).
        return {"hub_id": name_or_path, "revision": revision, "commit": hub_commit(name_or_path, revision)}
    files = {}
    for f in sorted(path.iterdir()):
        if f.suffix in (".safetensors", ".bin", ".gguf", ".pt") or f.name == "config.json":
            st = f.stat()
            files[f.name] = [st.st_size, int(st.st_mtime_ns)]
    return {"path": str(path.resolve()), "files": files}


def cache_key(name_or_path: str, revision: str | None, sequences, extra: dict | None = None) -> str:
    """Hex key of (model identity, every sequence's token ids and labels, extra settings)."""
    h = hashlib.sha256()
    h.update(json.dumps({"model": _model_fingerprint(name_or_path, revision), "extra": extra or {}},
                        sort_keys=True).encode())
    for s in sequences:
        h.update(torch.tensor(s.input_ids, dtype=torch.int64).numpy().tobytes())
        h.update(torch.tensor(s.labels, dtype=torch.int64).numpy().tobytes())
        h.update(b"|")
    return h.hexdigest()[:24]


def _adapters_off(model):
    return model.disable_adapter() if hasattr(model, "disable_adapter") else nullcontext()


@torch.no_grad()
def compute_reference(model, batches, n_sequences: int, device: torch.device) -> torch.Tensor:
    """Per-sequence summed log-probs (n_sequences,) of the model as it is now (adapters disabled)."""
    was_training = model.training
    model.eval()
    table = torch.full((n_sequences,), float("nan"), dtype=torch.float32)
    with _adapters_off(model):
        for b in batches:
            b = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in b.items()}
            sums, _ = unit_logps(model, b)
            u = b["units"].cpu()
            table[2 * u] = sums[:, 0].float().cpu()
            table[2 * u + 1] = sums[:, 1].float().cpu()
    model.train(was_training)
    return table


def load_or_compute(model, batches, n_sequences: int, device: torch.device, cache_dir: str | Path,
                    key: str) -> torch.Tensor:
    """The cached table for ``key`` or, if absent, :func:`compute_reference` written atomically."""
    from safetensors.torch import load_file, save_file

    path = Path(cache_dir) / f"ref-{key}.safetensors"
    if path.exists():
        table = load_file(str(path))["logps"]
        if table.numel() == n_sequences:
            print(f"reference log-probs: loaded {path}", file=sys.stderr)
            return table
    table = compute_reference(model, batches, n_sequences, device)
    missing = int(torch.isnan(table).sum())
    if missing:
        raise RuntimeError(f"{missing} sequences got no reference log-prob; the batches do not cover the data")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    save_file({"logps": table}, str(tmp))
    os.replace(tmp, path)
    print(f"reference log-probs: computed for {n_sequences} sequences, cached at {path}", file=sys.stderr)
    return table


class Reference:
    """Gives reference log-probs (P, 2) for a pair batch, from a table or a live model."""

    def __init__(self, table: torch.Tensor | None = None, model=None, frozen_copy: bool = False):
        self.table = table
        self.model = model
        self.frozen = None
        if table is None and frozen_copy:
            self.frozen = copy.deepcopy(model).eval()
            for p in self.frozen.parameters():
                p.requires_grad_(False)

    @torch.no_grad()
    def logps(self, batch: dict) -> torch.Tensor:
        if self.table is not None:
            u = batch["units"].cpu()
            out = torch.stack([self.table[2 * u], self.table[2 * u + 1]], dim=1)
            return out.to(batch["input_ids"].device)
        if self.frozen is not None:
            return unit_logps(self.frozen, batch)[0]
        was_training = self.model.training
        self.model.eval()  # no dropout in the reference
        with _adapters_off(self.model):
            out = unit_logps(self.model, batch)[0]
        self.model.train(was_training)
        return out
