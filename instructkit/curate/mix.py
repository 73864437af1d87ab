"""Mix several datasets by weights, caps and temperature, deterministically.

The rate of source i follows the T5 paper's examples-proportional mixing with an artificial limit,
plus a weight and temperature scaling (Raffel et al. 2020, section 3.5.2):

    r_i = weight_i * min(n_i, cap_i)            n_i = valid records of source i
    p_i = r_i ** (1 / T) / sum_j r_j ** (1 / T)

T = 1 is examples-proportional; T > 1 flattens the mixture toward equal shares (small sources are
upsampled, i.e. repeated); T -> infinity is equal mixing. The output holds ``total`` records
(default: sum of min(n_i, cap_i)), split by p_i with largest-remainder rounding. ``cap`` is also a
hard limit on a source's count, and without ``repeat`` so is n_i: their excess goes to the other
sources in proportion to their rates. Each source is sampled without replacement (whole passes
first when it is repeated) from a generator seeded by ``seed`` and the source's position, so the
same config always gives the same file. Sources in different formats (say Alpaca and ShareGPT) are
written in instructkit's canonical form (``messages``; ``prompt``/``chosen``/``rejected`` for pairs)
so the output is one valid training file; their other fields (``id``, ``family``, ...) are kept.

Config (YAML)::

    seed: 0
    temperature: 2.0
    total: 10000            # optional
    sources:
      - path: data/a.jsonl
        weight: 1.0         # optional
        cap: 5000           # optional
        format: auto        # optional
        name: a             # optional (default: file name)
"""

from __future__ import annotations

import difflib
import json
import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from instructkit.curate.text import iter_examples, resolve_format
from instructkit.data.errors import DataError, SkipReport
from instructkit.data.formats import SFT_FORMATS


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MixSource(_Strict):
    """One dataset of the mixture."""

    path: str
    weight: float = Field(1.0, gt=0, description="Multiplies the source's rate.")
    cap: int | None = Field(None, gt=0, description="Counts at most this many records toward the rate, "
                            "and takes at most this many.")
    format: str = "auto"
    name: str | None = None


class MixConfig(_Strict):
    """A mixture: sources, temperature, output size and seed."""

    sources: list[MixSource] = Field(..., min_length=1)
    temperature: float = Field(1.0, gt=0)
    total: int | None = Field(None, gt=0, description="Output records (default: sum of capped sizes).")
    seed: int = 0
    repeat: bool = Field(True, description="Allow repeating records of a source that gets more than "
                         "it has (temperature upsampling).")
    shuffle: bool = Field(True, description="Interleave the sources in a seeded random order.")
    source_field: str | None = Field("source", description="Add this field naming the source to each "
                                     "record (unless the record has it); null to leave records as is.")
    output_format: Literal["auto", "raw", "canonical"] = Field(
        "auto", description="raw = records as they are; canonical = instructkit's messages / preference / "
        "kto form plus the records' other fields; auto = raw when all sources share a format.")
    family_field: str = Field("family", description="Record field counted for per-family shares.")
    on_error: str = Field("skip", pattern="^(skip|raise)$")


def _format_errors(err: ValidationError, path: str) -> DataError:
    lines, first = [], None
    for e in err.errors():
        loc = [str(x) for x in e["loc"]]
        where = "".join(f"[{x}]" if x.isdigit() else (f".{x}" if i else x) for i, x in enumerate(loc))
        first = first or where
        if e["type"] == "extra_forbidden":
            owner = MixSource if loc[0] == "sources" and len(loc) > 2 else MixConfig
            valid = list(owner.model_fields)
            close = difflib.get_close_matches(loc[-1], valid, n=1, cutoff=0.5)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            lines.append(f"unknown key '{where}'.{hint} Valid keys: {', '.join(valid)}")
        elif e["type"] == "missing":
            lines.append(f"missing required key '{where}'")
        else:
            lines.append(f"'{where}': {e['msg']} (got {e.get('input')!r})")
    return DataError(path, None, first, "; ".join(lines),
                     "correct the key or value named (README, 'Data curation', lists every key)",
                     reason="bad_mix_config")


def load_mix_config(path: str | Path) -> MixConfig:
    """Read and validate a mixture YAML; errors name the key and suggest the closest valid one."""
    p = Path(path)
    if not p.exists():
        raise DataError(p, None, None, "mixture config not found", "check the path",
                        reason="missing_file")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise DataError(p, None, None, f"not valid YAML: {e}", "fix the YAML syntax",
                        reason="bad_mix_config") from None
    if not isinstance(raw, dict):
        raise DataError(p, None, None, "the config must be a mapping with a 'sources' list",
                        "write e.g.\nsources:\n  - path: a.jsonl\n    weight: 1", reason="bad_mix_config")
    try:
        return MixConfig.model_validate(raw)
    except ValidationError as e:
        raise _format_errors(e, str(p)) from None


def mixture_rates(sizes: list[int], weights: list[float], caps: list[int | None],
                  temperature: float) -> list[float]:
    """p_i = (w_i * min(n_i, cap_i)) ** (1/T), normalised (see the module docstring)."""
    r = [w * (min(n, c) if c else n) for n, w, c in zip(sizes, weights, caps)]
    if not any(r):
        return [0.0] * len(r)
    # Logs keep large counts with small temperatures from overflowing.
    logs = [math.log(x) / temperature if x > 0 else -math.inf for x in r]
    top = max(logs)
    scaled = [math.exp(v - top) for v in logs]
    s = sum(scaled)
    return [x / s for x in scaled]


def allocate(total: int, rates: list[float], limits: list[float]) -> list[int]:
    """Split ``total`` by ``rates`` under per-source ``limits`` (water-filling, then largest remainder)."""
    n = len(rates)
    fixed: dict[int, int] = {}
    while True:
        free = [i for i in range(n) if i not in fixed and rates[i] > 0]
        left = total - sum(fixed.values())
        mass = sum(rates[i] for i in free)
        want = {i: left * rates[i] / mass for i in free} if mass > 0 else {}
        over = [i for i in free if want[i] > limits[i]]
        if not over:
            break
        for i in over:
            fixed[i] = int(limits[i])
    counts = [fixed.get(i, 0) for i in range(n)]
    # A tiny epsilon keeps 749.9999999 (float noise of an exact 750) from losing its unit.
    floors = {i: int(min(math.floor(w + 1e-9), limits[i])) for i, w in want.items()}
    for i, f in floors.items():
        counts[i] = f
    rest = total - sum(counts)
    order = sorted(want, key=lambda i: (-(want[i] - floors[i]), i))
    for i in order:
        if rest <= 0:
            break
        if counts[i] < limits[i]:
            counts[i] += 1
            rest -= 1
    return counts


@dataclass
class MixResult:
    out: str
    total: int
    requested_total: int
    temperature: float
    seed: int
    output_format: str = "raw"
    sources: list[dict] = field(default_factory=list)
    families: dict = field(default_factory=dict)
    skipped: int = 0
    skip_summary: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


#: Keys that hold the conversation in some source format; everything else is metadata to keep.
_FORMAT_KEYS = frozenset({"instruction", "input", "output", "response", "context", "conversations", "messages",
                          "prompt", "completion", "chosen", "rejected", "label", "system"})


def _kind(fmt: str) -> str:
    return "sft" if fmt in SFT_FORMATS else "kto" if fmt == "kto" else "preference"


def _canonical_record(raw: dict, canonical: dict) -> dict:
    """The canonical conversation plus the raw record's metadata (id, family, ...)."""
    body = {k: v for k, v in canonical.items() if not k.startswith("_")}
    return {**body, **{k: v for k, v in raw.items() if k not in _FORMAT_KEYS and k not in body}}


def _multiplicities(n: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """How often each of ``n`` records is taken to draw ``count`` (whole passes, then a sample)."""
    mult = np.full(n, count // n, dtype=np.uint32)
    rest = count % n
    if rest:
        mult[rng.choice(n, size=rest, replace=False)] += 1
    return mult


def mix(config: MixConfig | str | Path, out: str | Path, report_path: str | Path | None = None) -> MixResult:
    """Write the mixture to ``out`` (JSON Lines, records unchanged except ``source_field``).

    Two streaming passes per source: one counts valid records, one writes the chosen ones.
    """
    cfg = config if isinstance(config, MixConfig) else load_mix_config(config)
    names = [s.name or Path(s.path).stem for s in cfg.sources]
    dupes = [n for n, k in Counter(names).items() if k > 1]
    if dupes:
        raise DataError("mixture config", None, "sources[].name", f"two sources are named {dupes[0]!r}",
                        "give the sources distinct 'name' values", reason="bad_mix_config")
    skips = SkipReport()
    sizes, formats = [], []
    for s in cfg.sources:
        per = SkipReport()
        fmt = resolve_format(s.path, s.format)
        formats.append(fmt)
        sizes.append(sum(1 for _ in iter_examples(s.path, fmt, cfg.on_error, per)))
        skips.merge(per)
    canonical = cfg.output_format == "canonical" or (cfg.output_format == "auto" and len(set(formats)) > 1)
    kinds = {_kind(f) for f in formats}
    if canonical and len(kinds) > 1:
        raise DataError("mixture config", None, "sources", f"the sources hold different kinds of data "
                        f"({', '.join(f'{n}: {f}' for n, f in zip(names, formats))}), which no single "
                        "training file can hold", "mix SFT sources and preference sources separately",
                        reason="bad_mix_config")
    if not any(sizes):
        raise DataError(", ".join(s.path for s in cfg.sources), None, None,
                        "no source has a valid record", skips.summary(), reason="empty")
    caps = [s.cap for s in cfg.sources]
    rates = mixture_rates(sizes, [s.weight for s in cfg.sources], caps, cfg.temperature)
    requested = cfg.total or sum(min(n, c) if c else n for n, c in zip(sizes, caps))
    limits = [min(c if c else math.inf, math.inf if cfg.repeat else n) for n, c in zip(sizes, caps)]
    limits = [lim if n else 0 for lim, n in zip(limits, sizes)]
    counts = allocate(requested, rates, limits)

    lines: list[str] = []
    fam_total: Counter = Counter()
    res = MixResult(str(out), sum(counts), requested, cfg.temperature, cfg.seed,
                    output_format="canonical" if canonical else "raw")
    for i, (s, name, n, count) in enumerate(zip(cfg.sources, names, sizes, counts)):
        mult = _multiplicities(n, count, np.random.default_rng([cfg.seed, i])) if n else \
            np.zeros(0, dtype=np.uint32)
        fams: Counter = Counter()
        for j, ex in enumerate(iter_examples(s.path, formats[i], "skip", SkipReport())):
            k = int(mult[j])
            if not k:
                continue
            rec = _canonical_record(ex.raw, ex.canonical) if canonical else ex.raw
            if cfg.source_field and cfg.source_field not in rec:
                rec = {**rec, cfg.source_field: name}
            text = json.dumps(rec, ensure_ascii=False, default=str)
            lines.extend([text] * k)
            fam = rec.get(cfg.family_field)
            if fam is not None:
                fams[str(fam)] += k
        fam_total.update(fams)
        res.sources.append({"name": name, "path": s.path, "valid": n, "weight": s.weight, "cap": s.cap,
                            "rate": round(rates[i], 6), "count": count,
                            "share": round(count / max(1, res.total), 6),
                            "max_repeats": int(mult.max()) if len(mult) else 0,
                            "unique": int(np.count_nonzero(mult)), "families": dict(fams)})
    if fam_total:
        res.families = {f: {"count": c, "share": round(c / max(1, res.total), 6)}
                        for f, c in sorted(fam_total.items(), key=lambda kv: -kv[1])}
    if cfg.shuffle:
        order = np.random.default_rng([cfg.seed, len(cfg.sources), 7919]).permutation(len(lines))
        lines = [lines[k] for k in order]
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as fh:
        for t in lines:
            fh.write(t + "\n")
    res.skipped, res.skip_summary = len(skips), (skips.summary() if len(skips) else "")
    if report_path:
        Path(report_path).parent.mkdir(parents=True, exist_ok=True)
        Path(report_path).write_text(json.dumps(res.to_dict(), indent=2) + "\n", encoding="utf-8")
    return res
