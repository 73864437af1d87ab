"""The teacher side of knowledge distillation: live logits, or top-k log-probs cached on disk.

``distill.teacher_logits``:

- ``live``: the frozen teacher runs on every micro-batch (no grad, eval mode) and its logits at the
  target positions go into the KD loss (full vocabulary, or its top-k with ``distill.top_k``).
- ``cache``: before training, one teacher pass over every train and eval example stores, per target
  position, the top-k token ids, their log-probs at the distillation temperature (fp16) and the log
  of the remaining mass (fp32), in ``cache_dir/teacher-<key>.safetensors``. The key covers the
  teacher's identity (config and weight file names, sizes, modification times), every example's
  token ids and loss mask, the temperature and k; a second run with the same teacher and data loads
  it instantly and needs no teacher in memory. Batches find their examples by content (a hash of
  each packed or padded sequence's ids and labels), so packing, shuffling and epochs do not matter.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

from instructkit.losses import kd_divergence, kd_loss, kd_loss_topk, topk_logprobs
from instructkit.models import ModelError, target_logits
from instructkit.reference import _model_fingerprint


def check_same_vocab(student_tokenizer, teacher_tokenizer, teacher_path: str) -> None:
    """Token-level KD compares distributions id by id: both tokenizers must map every string alike."""
    sv, tv = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
    if sv == tv:
        return
    only_s = sorted(set(sv) - set(tv))[:5]
    only_t = sorted(set(tv) - set(sv))[:5]
    moved = sorted(k for k in set(sv) & set(tv) if sv[k] != tv[k])[:5]
    raise ModelError(
        f"the teacher '{teacher_path}' does not share the student's vocabulary ({len(sv)} vs {len(tv)} tokens; "
        f"only in the student: {only_s}, only in the teacher: {only_t}, different ids: {moved}). Token-level "
        f"distillation needs one tokenizer: pick a student of the teacher's family (or build both with the "
        f"same tokenizer), turn off data.add_special_tokens, or use sequence-level distillation "
        f"(`instructkit synth distill-data`), which works across vocabularies")


def segments(batch: dict) -> list[tuple[int, int, int]]:
    """``(row, start, end)`` of every example in a packed or padded batch, in row-major order."""
    idx = batch["example_index"].cpu().numpy()
    out = []
    for r in range(idx.shape[0]):
        row = idx[r]
        change = np.flatnonzero(np.diff(row)) + 1
        bounds = np.concatenate([[0], change, [len(row)]])
        for a, b in zip(bounds[:-1], bounds[1:]):
            if row[a] >= 0:
                out.append((r, int(a), int(b)))
    return out


def _content_key(ids, labels) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    h.update(np.asarray(ids, dtype=np.int64).tobytes())
    h.update(np.asarray(labels, dtype=np.int64).tobytes())
    return h.digest()


class TopKCache:
    """Per-example teacher top-k log-probs at target positions, looked up by sequence content."""

    def __init__(self, keys: list[bytes], offsets: torch.Tensor, ids: torch.Tensor, logp: torch.Tensor,
                 rest: torch.Tensor):
        self.index = {k: i for i, k in enumerate(keys)}
        self.offsets, self.ids, self.logp, self.rest = offsets, ids, logp, rest

    @classmethod
    @torch.no_grad()
    def build(cls, teacher, examples, *, k: int, temperature: float, device: torch.device, pad_id: int,
              batch_size: int = 16) -> "TopKCache":
        from instructkit.data.packing import collate_padded

        unique: dict[bytes, object] = {}
        for e in examples:
            unique.setdefault(_content_key(e.input_ids, e.labels), e)
        keys = list(unique)
        exs = [unique[key] for key in keys]
        counts = torch.tensor([e.n_targets for e in exs], dtype=torch.long)
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
        total = int(offsets[-1])
        ids = torch.zeros((total, k), dtype=torch.int32)
        logp = torch.zeros((total, k), dtype=torch.float16)
        rest = torch.zeros(total, dtype=torch.float32)
        teacher.eval()
        for s in range(0, len(exs), batch_size):
            b = collate_padded(exs[s:s + batch_size], pad_id=pad_id)
            b = {n: v.to(device) for n, v in b.items()}
            logits, _ = target_logits(teacher, b)
            i, lp, r = topk_logprobs(logits, k, temperature)
            a, z = int(offsets[s]), int(offsets[min(s + batch_size, len(exs))])
            ids[a:z], logp[a:z], rest[a:z] = i.int().cpu(), lp.half().cpu(), r.cpu()
        return cls(keys, offsets, ids, logp, rest)

    def save(self, path: Path) -> None:
        from safetensors.torch import save_file

        path.parent.mkdir(parents=True, exist_ok=True)
        keys = torch.from_numpy(np.frombuffer(b"".join(self.index), dtype=np.uint8).reshape(-1, 16).copy())
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        save_file({"keys": keys, "offsets": self.offsets, "ids": self.ids, "logp": self.logp, "rest": self.rest},
                  str(tmp))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> "TopKCache":
        from safetensors.torch import load_file

        t = load_file(str(path))
        keys = [bytes(row) for row in t["keys"].numpy()]
        return cls(keys, t["offsets"], t["ids"], t["logp"], t["rest"])

    def lookup(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Teacher (ids, logp, rest) for the batch's target positions, in ``target_logits`` order."""
        ids_b, labels_b = batch["input_ids"].cpu().numpy(), batch["labels"].cpu().numpy()
        rows = []
        for r, a, b in segments(batch):
            key = _content_key(ids_b[r, a:b], labels_b[r, a:b])
            i = self.index.get(key)
            if i is None:
                raise RuntimeError("a batch holds an example that is not in the teacher cache; delete the cache "
                                   "file or set distill.teacher_logits: live")
            rows.append(torch.arange(int(self.offsets[i]), int(self.offsets[i + 1])))
        sel = torch.cat(rows) if rows else torch.zeros(0, dtype=torch.long)
        dev = batch["input_ids"].device
        return self.ids[sel].long().to(dev), self.logp[sel].float().to(dev), self.rest[sel].to(dev)


def cache_key(teacher_path: str, examples, extra: dict) -> str:
    h = hashlib.sha256(json.dumps({"teacher": _model_fingerprint(teacher_path, None), **extra},
                                  sort_keys=True).encode())
    for e in examples:
        h.update(_content_key(e.input_ids, e.labels))
    return h.hexdigest()[:24]


def load_or_build_cache(teacher_loader, teacher_path: str, examples, *, k: int, temperature: float,
                        cache_dir: str | Path, device: torch.device, pad_id: int) -> TopKCache:
    """The cache for these examples, loaded if present; else built with ``teacher_loader()`` and saved."""
    key = cache_key(teacher_path, examples, {"k": k, "temperature": temperature})
    path = Path(cache_dir) / f"teacher-{key}.safetensors"
    if path.exists():
        print(f"teacher top-{k} log-probs: loaded {path}", file=sys.stderr)
        return TopKCache.load(path)
    cache = TopKCache.build(teacher_loader(), examples, k=k, temperature=temperature, device=device, pad_id=pad_id)
    cache.save(path)
    print(f"teacher top-{k} log-probs: computed for {len(cache.index)} examples ({cache.ids.shape[0]} target "
          f"tokens), cached at {path}", file=sys.stderr)
    return cache


class Teacher:
    """KD term for a batch: ``kd_sum(student_logits, batch)`` from a live model or a top-k cache."""

    def __init__(self, cfg, model=None, cache: TopKCache | None = None):
        self.cfg, self.model, self.cache = cfg, model, cache

    @torch.no_grad()
    def _live_logits(self, batch: dict) -> torch.Tensor:
        return target_logits(self.model, batch)[0]

    def kd_sum(self, student_logits: torch.Tensor, batch: dict, live: bool = False) -> torch.Tensor:
        """Summed KD divergence over the batch's targets (``live`` forces the model, e.g. on-policy)."""
        c = self.cfg
        if self.cache is not None and not live:
            ids, lp, rest = self.cache.lookup(batch)
            return kd_loss_topk(student_logits, ids, lp, rest, c.temperature, c.kind, c.beta)
        t = self._live_logits(batch)
        v = min(t.shape[-1], student_logits.shape[-1])  # padded embedding tables may differ in size
        s, t = student_logits[:, :v], t[:, :v]
        if c.top_k is not None:
            ids, lp, rest = topk_logprobs(t, c.top_k, c.temperature)
            return kd_loss_topk(s, ids, lp, rest, c.temperature, c.kind, c.beta)
        return kd_loss(s, t, c.temperature, c.kind, c.beta)


@torch.no_grad()
def kl_to_teacher(student, teacher, batches, device: torch.device | None = None) -> dict[str, float]:
    """Held-out agreement with the teacher: mean forward and reverse KL per target token (T = 1, full vocab)."""
    device = device or next(student.parameters()).device
    student.eval()
    teacher.eval()
    fwd = rev = 0.0
    n = 0
    for b in batches:
        b = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in b.items()}
        s, _ = target_logits(student, b)
        t, _ = target_logits(teacher, b)
        v = min(s.shape[-1], t.shape[-1])
        sl, tl = torch.log_softmax(s[:, :v].float(), -1), torch.log_softmax(t[:, :v].float(), -1)
        fwd += float(kd_divergence(tl, sl, "forward_kl").sum())
        rev += float(kd_divergence(tl, sl, "reverse_kl").sum())
        n += s.shape[0]
    return {"kl_teacher_student": fwd / max(1, n), "kl_student_teacher": rev / max(1, n), "tokens": n}
