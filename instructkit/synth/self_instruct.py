"""Self-Instruct bootstrapping (Wang et al. 2023, arXiv:2212.10560) and its Alpaca variant (Taori et al. 2023).

A generator model (local or an OpenAI-compatible endpoint) writes new tasks from a handful of
human-written seed tasks, and those tasks grow the pool it is prompted from. Each round:

1. **Instructions.** ``request_batch_size`` prompts, each listing 8 example instructions (6 sampled
   from the seeds, 2 from those generated so far), numbered, ending at ``9.`` for the model to
   continue. The reply is split at ``\\n<number>.``. Alpaca variant: 3 seed tasks shown with input
   and output, and the model continues to task 20, each with its own input and output.
2. **Instruction filters**, in this order, each counted: empty, at most 3 or more than 150 words,
   a blacklisted keyword as a whole word (image, graph, picture, file, map, draw, plot, go to, video,
   audio, music, flowchart, diagram and plurals: things a text model cannot do), starting with "Write
   a program" (the reference drops these: the model tends to bolt it onto any task), starting with
   punctuation, starting with a non-ASCII character, and ROUGE-L F > 0.7 against any instruction
   in the pool (seeds + accepted, including ones accepted earlier in the same batch).
3. **Classification or not** (few-shot from the seeds' ``is_classification`` labels; an answer that
   is neither yes nor no counts as ``unparsed`` and the task is treated as not classification).
4. **Instances**: output-first for classification tasks (the model writes a class label, then an input
   for it, so labels are not all the same), input-first otherwise; few-shot from the seeds' instances.
5. **Instance filters**: a reply cut at the token limit loses its last instance; empty output; input
   equal to output; input or output ending with a colon (an unfinished generation); a task whose one
   input got different outputs loses all its instances; duplicates within a task; at most 5 per task
   (seeded sample).
6. **Final deduplication** of (instruction, input, output) over the whole output file.

Outputs: ``OUT`` (JSONL, Alpaca fields ``instruction``/``input``/``output``, trainable as is, with
``id``, ``is_classification`` and ``provenance``: generator, round, the seed ids and machine task ids
in the prompt, max ROUGE-L and the most similar pool instruction, and every filter decision),
``OUT.rejected.jsonl`` (each removed candidate and why), ``OUT.summary.json`` (counts per filter) and
``OUT.progress.jsonl`` (one line per finished round). A run stopped at any point and started again
with the same arguments resumes after the last finished round and never writes a record twice.

Deviations from the reference code, on purpose: prompt wording is ours; ``presence_penalty`` is not
sent (local generation has no such knob, and many servers ignore it); the first letter of an
instruction is upper-cased without lower-casing the rest (``str.capitalize`` turned "Python" into
"python").
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import string
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from instructkit.data.errors import DataError
from instructkit.data.readers import read_records
from instructkit.synth.generators import Generator, GenResult, Sampling
from instructkit.synth.rouge import RougePool

BLACKLIST = ("image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map", "maps",
             "draw", "plot", "go to", "video", "audio", "music", "flowchart", "diagram")
_BLACKLIST_RE = re.compile(r"\b(" + "|".join(re.escape(w) for w in BLACKLIST) + r")\b", re.IGNORECASE)
INSTRUCTION_FILTERS = ("empty", "too_short", "too_long", "blacklist", "write_a_program", "leading_punctuation",
                       "non_ascii_start", "rouge_similar")
INSTANCE_FILTERS = ("truncated_last", "empty_output", "input_equals_output", "ends_with_colon",
                    "conflicting_outputs", "duplicate_in_task", "over_cap", "duplicate_final")


@dataclass
class SelfInstructConfig:
    """Settings of a run. Every field except ``num`` must match when a run is resumed.

    Attributes:
        num: Machine-generated instructions to reach (the pool size minus the seeds).
        variant: ``self-instruct`` (8 prompt instructions, 2 of them machine-made; classification and
            instance steps) or ``alpaca`` (3 seed tasks shown with input/output; 20 tasks per call,
            one instance each, generated together with the instruction).
        seed: Seeds prompt sampling and local generation; round r uses ``seed`` and r.
        request_batch_size: Prompts per round.
        num_prompt_instructions: Examples in an instruction prompt (None = 8, or 3 for alpaca).
        num_machine_in_prompt: How many of them come from the generated pool (self-instruct).
        max_instances: Instances kept per task.
        similarity_threshold: ROUGE-L F above which a new instruction is a near duplicate.
        keep_truncated: When a reply hits the token limit, drop only its last item instead of the
            whole reply (self-instruct drops the whole reply; alpaca always drops only the last).
        patience: Stop after this many rounds in a row that add no instruction.
        max_rounds: Stop after this many rounds in total (None = no limit).
    """

    num: int = 100
    variant: str = "self-instruct"
    seed: int = 0
    request_batch_size: int = 5
    num_prompt_instructions: int | None = None
    num_machine_in_prompt: int = 2
    max_instances: int = 5
    similarity_threshold: float = 0.7
    keep_truncated: bool = False
    patience: int = 10
    max_rounds: int | None = None
    instruction_sampling: Sampling | None = None
    classify_sampling: Sampling | None = None
    instance_sampling: Sampling | None = None

    def __post_init__(self):
        if self.variant not in ("self-instruct", "alpaca"):
            raise ValueError(f"variant must be 'self-instruct' or 'alpaca', got {self.variant!r}")
        if self.num_prompt_instructions is None:
            self.num_prompt_instructions = 3 if self.variant == "alpaca" else 8
        if self.num < 1 or self.request_batch_size < 1 or self.max_instances < 1:
            raise ValueError("num, request_batch_size and max_instances must be >= 1")
        if not 0 <= self.num_machine_in_prompt < self.num_prompt_instructions:
            raise ValueError("num_machine_in_prompt must be in [0, num_prompt_instructions)")
        alpaca = self.variant == "alpaca"
        self.instruction_sampling = self.instruction_sampling or (
            Sampling(max_tokens=3072, temperature=1.0, top_p=1.0, stop=["\n20", "20.", "20 ."]) if alpaca else
            Sampling(max_tokens=1024, temperature=0.7, top_p=0.5, stop=["\n\n", "\n16", "16.", "16 ."]))
        self.classify_sampling = self.classify_sampling or Sampling(max_tokens=3, temperature=0.0,
                                                                    stop=["\n", "Task"])
        self.instance_sampling = self.instance_sampling or Sampling(
            max_tokens=350, temperature=0.0, stop=[f"Example {self.max_instances + 1}", "Task:"])

    def resume_key(self) -> dict:
        d = asdict(self)
        d.pop("num")
        d.pop("max_rounds")
        d.pop("patience")
        return d


# ---------------------------------------------------------------------------------------------- seeds


@dataclass
class SeedTask:
    id: str
    instruction: str
    instances: list[dict]
    is_classification: bool


def load_seed_tasks(path: str | Path) -> list[SeedTask]:
    """Self-Instruct seed tasks (``id``, ``instruction``, ``instances``, ``is_classification`` per line)."""
    tasks = []
    for line, rec in read_records(path):
        def need(key, typ, what):
            if not isinstance(rec.get(key), typ):
                raise DataError(path, line, key, f"expected {what}, got {type(rec.get(key)).__name__}",
                                "use the Self-Instruct seed format: id, instruction, instances "
                                "[{input, output}], is_classification", reason="missing_field")
            return rec[key]
        instruction = need("instruction", str, "a string")
        if not instruction.strip():
            raise DataError(path, line, "instruction", "empty instruction", "give every seed task an "
                            "instruction", reason="empty")
        instances = need("instances", list, "a list of {input, output}")
        for k, inst in enumerate(instances):
            if not isinstance(inst, dict) or not isinstance(inst.get("output"), str) \
                    or not isinstance(inst.get("input", ""), str):
                raise DataError(path, line, f"instances[{k}]", "an instance needs string 'input' and 'output'",
                                "write each instance as {\"input\": \"...\", \"output\": \"...\"}",
                                reason="invalid")
        clf = rec.get("is_classification", False)
        if not isinstance(clf, bool):
            raise DataError(path, line, "is_classification", f"expected true/false, got {clf!r}",
                            "write is_classification as a JSON boolean", reason="invalid")
        tasks.append(SeedTask(str(rec.get("id", f"seed_{line}")), instruction.strip(), instances, clf))
    if len(tasks) < 2:
        raise DataError(path, None, None, f"only {len(tasks)} seed task(s)", "give at least a few seed tasks "
                        "(Self-Instruct ships 175)", reason="empty")
    return tasks


# ---------------------------------------------------------------------------------------------- prompts


def _one_line(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().rstrip(":")


def instruction_prompt(instructions: list[str]) -> str:
    """Numbered example instructions; the model continues after the next number."""
    lines = ["Here is a numbered list of varied tasks that people ask a helpful assistant to do. "
             "Each task is different in topic and in kind:"]
    lines += [f"{i}. {_one_line(x)}" for i, x in enumerate(instructions, 1)]
    return "\n".join(lines) + f"\n{len(instructions) + 1}."


def alpaca_prompt(examples: list[SeedTask], total: int = 20) -> str:
    """Alpaca-style prompt: requirements, then seed tasks with input and output, ``###``-separated."""
    head = (f"Write {total} varied tasks for training an assistant to follow instructions. For each task "
            "give an instruction, an input and a correct output.\n"
            "Guidelines:\n"
            "- Use many different verbs and kinds of task (questions, rewriting, classification, "
            "brainstorming, reasoning, coding, editing, and more).\n"
            "- Each instruction is one or two sentences, written in English, and can be done by a "
            "text-only model: no pictures, audio or actions in the world.\n"
            "- The input is a concrete example for the instruction, under 100 words; write <noinput> "
            "when the instruction needs none.\n"
            "- The output is a good answer to the instruction and input, under 100 words.\n"
            "Tasks:\n")
    parts = []
    for i, t in enumerate(examples, 1):
        inst = t.instances[0] if t.instances else {"input": "", "output": ""}
        parts.append(f"###\n{i}. Instruction: {_one_line(t.instruction)}\n"
                     f"{i}. Input:\n{inst.get('input', '').strip() or '<noinput>'}\n"
                     f"{i}. Output:\n{inst['output'].strip()}\n")
    return head + "".join(parts) + f"###\n{len(examples) + 1}. Instruction:"


def classify_prompt(demos: list[SeedTask], instruction: str) -> str:
    head = ("Say whether each task is a classification task: one whose answer is picked from a small, "
            "fixed set of labels (yes/no, a category, an option letter).\n\n")
    body = "".join(f"Task: {_one_line(t.instruction)}\nClassification: {'Yes' if t.is_classification else 'No'}\n\n"
                   for t in demos)
    return head + body + f"Task: {_one_line(instruction)}\nClassification:"


def instance_prompt(demos: list[SeedTask], instruction: str, classification: bool) -> str:
    """Output-first few-shot prompt (classification) or input-first (everything else)."""
    if classification:
        head = ("For each classification task, give possible class labels, each followed by an input that "
                "has that label.\n\n")
        body = ""
        for t in demos:
            body += f"Task: {_one_line(t.instruction)}\n"
            for inst in t.instances:
                body += f"Class label: {inst['output'].strip()}\n"
                if inst.get("input", "").strip():
                    body += f"Input: {inst['input'].strip()}\n"
            body += "\n"
        return head + body + f"Task: {_one_line(instruction)}\nClass label:"
    head = ("For each task, write examples: an input and the correct output. When the task needs no "
            "input, write only the output.\n\n")
    body = ""
    for t in demos:
        body += f"Task: {_one_line(t.instruction)}\n"
        with_input = [i for i in t.instances if i.get("input", "").strip()]
        if with_input:
            for k, inst in enumerate(with_input, 1):
                body += f"Example {k}\nInput: {inst['input'].strip()}\nOutput: {inst['output'].strip()}\n"
        else:
            body += f"Output: {t.instances[0]['output'].strip() if t.instances else ''}\n"
        body += "\n"
    return head + body + f"Task: {_one_line(instruction)}\n"


# ---------------------------------------------------------------------------------------------- parsing


# "\n12. text"; the number must be followed by spaces or the line end, never by the next line.
_NUMBERED = re.compile(r"\n[ \t]*\d+[ \t]?[.)](?:[ \t]+|(?=\n)|$)")
_LEADING_NUMBER = re.compile(r"^\s*\d+\s?[.)]\s*")


def parse_instructions(text: str) -> list[str]:
    """Split a continuation of a numbered list into instructions (whitespace collapsed)."""
    text = _LEADING_NUMBER.sub("", text.lstrip("\n"), count=1)  # chat models often repeat the number
    out = []
    for piece in _NUMBERED.split("\n" + text):
        piece = re.sub(r"\s+", " ", piece).strip()
        out.append(piece[:1].upper() + piece[1:])
    while out and not out[0]:
        out.pop(0)
    return out


def parse_alpaca(text: str, first_number: int) -> tuple[list[dict], int]:
    """``(tasks, n_unparsed)`` from an Alpaca-style continuation (``###``-separated, numbered fields)."""
    tasks, bad = [], 0
    for piece in (f"{first_number}. Instruction:" + text).split("###"):
        if not piece.strip():
            continue
        fields = re.split(r"\d+\s*\.\s*(Instruction|Input|Output)\s*:", piece)
        if len(fields) != 7 or fields[1::2] != ["Instruction", "Input", "Output"]:
            bad += 1
            continue
        inp = fields[4].strip()
        tasks.append({"instruction": re.sub(r"\s+", " ", fields[2]).strip(),
                      "input": "" if inp.lower() == "<noinput>" else inp, "output": fields[6].strip()})
    return tasks, bad


def instruction_filter(inst: str) -> str | None:
    """The first rule ``inst`` breaks (see :data:`INSTRUCTION_FILTERS`), or None; ROUGE is checked apart."""
    if not inst:
        return "empty"
    n = len(inst.split())
    if n <= 3:
        return "too_short"
    if n > 150:
        return "too_long"
    if _BLACKLIST_RE.search(inst):
        return "blacklist"
    if inst.startswith("Write a program"):
        return "write_a_program"
    if inst[0] in string.punctuation:
        return "leading_punctuation"
    if not inst[0].isascii():
        return "non_ascii_start"
    return None


def parse_classification_answer(text: str) -> bool | None:
    t = text.strip().lower()
    if t.startswith("yes"):
        return True
    if t.startswith("no"):
        return False
    return None


_OUTPUT = re.compile(r"Output\s*\d*\s*:")
_INPUT = re.compile(r"Input\s*\d*\s*:")


def _split_input_output(text: str) -> tuple[str, str]:
    if _OUTPUT.search(text):
        inp, out = _OUTPUT.split(text, maxsplit=2)[:2]
    else:
        inp, out = "", text
    out = _INPUT.split(out)[0]  # a second example glued on: keep the first output only
    return re.sub(r"^\s*Input\s*\d*\s*:", "", inp).strip(), out.strip()


def parse_instances(text: str, classification: bool) -> list[tuple[str, str]]:
    """(input, output) pairs from an instance-generation reply."""
    text = text.strip()
    pairs = []
    if classification:
        if not text:
            return []
        for chunk in ("Class label:" + text).split("Class label:")[1:]:
            label, _, rest = chunk.strip().partition("\n")
            pairs.append((re.sub(r"^\s*Input\s*:", "", rest).strip(), label.strip()))
        return pairs
    if re.search(r"Example\s?\d*\.?", text):
        for chunk in re.split(r"Example\s?\d*\.?", text):
            if chunk.strip():
                pairs.append(_split_input_output(chunk))
    elif _OUTPUT.search(text):
        pairs.append(_split_input_output(text))
    return pairs


def filter_instances(pairs: list[tuple[str, str]], truncated: bool, max_instances: int,
                     rng: random.Random) -> tuple[list[tuple[str, str]], Counter]:
    """Apply the instance filters in order; returns the kept pairs and removals per filter."""
    removed: Counter = Counter()
    if truncated and pairs:
        pairs = pairs[:-1]
        removed["truncated_last"] += 1
    kept = []
    for inp, out in pairs:
        if not out:
            removed["empty_output"] += 1
        elif inp == out:
            removed["input_equals_output"] += 1
        elif inp.endswith(":") or out.endswith(":"):
            removed["ends_with_colon"] += 1
        else:
            kept.append((inp, out))
    outputs: dict[str, set] = {}
    for inp, out in kept:
        if inp:
            outputs.setdefault(inp, set()).add(out)
    if any(len(v) > 1 for v in outputs.values()):
        removed["conflicting_outputs"] += len(kept)
        return [], removed
    unique = list(dict.fromkeys(kept))
    removed["duplicate_in_task"] += len(kept) - len(unique)
    if len(unique) > max_instances:
        removed["over_cap"] += len(unique) - max_instances
        picked = sorted(rng.sample(range(len(unique)), max_instances))
        unique = [unique[i] for i in picked]
    return unique, removed


# ---------------------------------------------------------------------------------------------- the run


class SelfInstructError(RuntimeError):
    """The run cannot start or continue as asked (e.g. its output belongs to a different run)."""


@dataclass
class _State:
    round: int = 0
    machine: list[dict] = field(default_factory=list)  # accepted tasks: id, instruction, ...
    counts: Counter = field(default_factory=Counter)
    records: int = 0
    rejected: int = 0
    idle_rounds: int = 0


def _paths(out: Path) -> dict[str, Path]:
    return {"progress": Path(str(out) + ".progress.jsonl"), "rejected": Path(str(out) + ".rejected.jsonl"),
            "summary": Path(str(out) + ".summary.json")}


def _truncate_lines(path: Path, n: int) -> None:
    """Keep the first ``n`` complete lines of ``path`` (drops anything written after the last commit)."""
    if not path.exists():
        if n:
            raise SelfInstructError(f"{path} is missing but the progress file says it held {n} lines; "
                                    f"delete the progress file to start over")
        return
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    complete = lines[:-1]  # the piece after the last newline is empty or a partial line
    if len(complete) < n:
        raise SelfInstructError(f"{path} has {len(complete)} lines but the progress file says {n}; it was "
                                f"edited or truncated since. Delete it and its .progress.jsonl to start over")
    with open(path, "wb") as f:
        f.write(b"".join(x + b"\n" for x in complete[:n]))


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


class SelfInstruct:
    """One Self-Instruct (or Alpaca) run writing to ``out``; call :meth:`run`."""

    def __init__(self, seeds_path: str | Path, generator: Generator, out: str | Path, cfg: SelfInstructConfig,
                 log=None):
        self.seeds_path = Path(seeds_path)
        self.seeds = load_seed_tasks(seeds_path)
        self.gen = generator
        self.cfg = cfg
        self.out = Path(out)
        self.paths = _paths(self.out)
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.identity = {"seeds_sha256": hashlib.sha256(self.seeds_path.read_bytes()).hexdigest(),
                         "generator": generator.name, "config": cfg.resume_key()}
        self.key = _digest(self.identity)
        self.pool = RougePool([t.instruction for t in self.seeds])
        self.pool_ids = [t.id for t in self.seeds]
        self.state = _State()
        self.seen: set[tuple[str, str, str]] = set()
        clf = [t for t in self.seeds if t.is_classification]
        gen = [t for t in self.seeds if not t.is_classification]
        demo_rng = random.Random(cfg.seed)
        # Few-shot demonstrations drawn once per run from the seeds, so every prompt of a run is alike.
        self.classify_demos = demo_rng.sample(clf, min(6, len(clf))) + demo_rng.sample(gen, min(6, len(gen)))
        demo_rng.shuffle(self.classify_demos)
        self.clf_demos = demo_rng.sample(clf, min(8, len(clf))) or demo_rng.sample(self.seeds, min(4, len(self.seeds)))
        self.gen_demos = demo_rng.sample(gen, min(8, len(gen))) or demo_rng.sample(self.seeds, min(4, len(self.seeds)))

    # ------------------------------------------------------------------------------------ resume

    def _restore(self) -> None:
        prog = self.paths["progress"]
        if not prog.exists():
            if self.out.exists() and self.out.stat().st_size > 0:
                raise SelfInstructError(f"{self.out} exists but has no {prog.name}: it was not written by a "
                                        f"self-instruct run. Choose another --out or delete it")
            for p in (self.out, self.paths["rejected"]):
                p.parent.mkdir(parents=True, exist_ok=True)
                p.write_text("", encoding="utf-8")
            return
        lines = prog.read_text(encoding="utf-8").split("\n")
        entries = [json.loads(ln) for ln in lines[:-1]]  # the last piece is '' or a line cut by a kill
        if not entries:  # killed before the first line was complete: nothing was committed
            prog.unlink()
            return self._restore()
        if entries[0].get("key") != self.key:
            old = entries[0].get("identity", {})
            diff = [k for k in set(old) | set(self.identity) if old.get(k) != self.identity.get(k)]
            raise SelfInstructError(
                f"{self.out} was written by a run with different arguments ({', '.join(sorted(diff))} differ); "
                f"resume with the same seeds, generator and options, or choose another --out")
        for e in entries[1:]:
            self.state.round = e["round"] + 1
            self.state.machine.extend(e["tasks"])
            self.state.counts = Counter(e["counts"])
            self.state.records, self.state.rejected = e["records"], e["rejected"]
            self.state.idle_rounds = e["idle_rounds"]
        _truncate_lines(self.out, self.state.records)
        _truncate_lines(self.paths["rejected"], self.state.rejected)
        for t in self.state.machine:
            self.pool.add(t["instruction"])
            self.pool_ids.append(t["id"])
        for _, rec in read_records(self.out):
            self.seen.add((rec["instruction"], rec["input"], rec["output"]))
        if entries[1:]:
            self.log(f"resuming {self.out}: {len(self.state.machine)} instructions, {self.state.records} records "
                     f"after round {self.state.round - 1}")

    def _start_progress(self) -> None:
        prog = self.paths["progress"]
        if not prog.exists() or prog.stat().st_size == 0:
            with open(prog, "w", encoding="utf-8") as f:
                f.write(json.dumps({"key": self.key, "identity": self.identity}) + "\n")

    # ------------------------------------------------------------------------------------ rounds

    def _generate(self, requests: list, sampling: Sampling, seed_offset: int) -> list[GenResult]:
        s = Sampling(**{**asdict(sampling), "seed": self.cfg.seed * 1_000_003 + self.state.round * 10 + seed_offset})
        self.state.counts["requests"] += len(requests)
        results = self.gen.generate(requests, s)
        failed = sum(r.error is not None for r in results)
        self.state.counts["requests_failed"] += failed
        for r in results:
            if r.error is not None:
                self.log(f"warning: a request failed after retries (counted, skipped): {r.error[:200]}")
        return results

    def _candidates(self, rng: random.Random) -> list[dict]:
        """One batch of instruction requests -> parsed candidates with their prompt provenance."""
        c, cands, prompts, metas = self.cfg, [], [], []
        machine = self.state.machine
        for _ in range(c.request_batch_size):
            if c.variant == "alpaca":
                shown = rng.sample(self.seeds, min(c.num_prompt_instructions, len(self.seeds)))
                prompts.append(alpaca_prompt(shown))
                metas.append({"prompt_seed_ids": [t.id for t in shown], "prompt_machine_ids": []})
                continue
            picked_m = rng.sample(machine, min(c.num_machine_in_prompt, len(machine)))
            picked_s = rng.sample(self.seeds, min(c.num_prompt_instructions - len(picked_m), len(self.seeds)))
            items = [(t["id"], t["instruction"], "m") for t in picked_m] + [(t.id, t.instruction, "s") for t in picked_s]
            rng.shuffle(items)
            prompts.append(instruction_prompt([x[1] for x in items]))
            metas.append({"prompt_seed_ids": [x[0] for x in items if x[2] == "s"],
                          "prompt_machine_ids": [x[0] for x in items if x[2] == "m"]})
        for k, (res, meta) in enumerate(zip(self._generate(prompts, c.instruction_sampling, 0), metas)):
            if res.error is not None:
                continue
            truncated = res.finish_reason == "length"
            if c.variant == "alpaca":
                tasks, bad = parse_alpaca(res.text, c.num_prompt_instructions + 1)
                self.state.counts["unparsed_items"] += bad
                if truncated and tasks:
                    tasks = tasks[:-1]
                    self.state.counts["truncated_items_dropped"] += 1
            else:
                items = parse_instructions(res.text)
                if truncated and not c.keep_truncated:
                    self.state.counts["truncated_responses_dropped"] += 1
                    self.state.counts["truncated_items_dropped"] += len(items)
                    self._reject([{"instruction": x, "reason": "truncated_response", **meta} for x in items])
                    continue
                if truncated and items:
                    items = items[:-1]
                    self.state.counts["truncated_items_dropped"] += 1
                if not items:
                    self.state.counts["responses_without_items"] += 1
                tasks = [{"instruction": x} for x in items]
            for t in tasks:
                cands.append({**t, **meta, "request": k})
        return cands

    def _reject(self, rows: list[dict]) -> None:
        self._pending_rejected.extend(rows)

    def _screen(self, cands: list[dict], need: int) -> list[dict]:
        """Instruction filters and the ROUGE-L check; accepted candidates join the pool at once."""
        accepted = []
        for cand in cands:
            self.state.counts["candidates"] += 1
            inst = cand["instruction"]
            why = instruction_filter(inst)
            sim, idx = (0.0, None)
            if why is None:
                sim, idx = self.pool.max_similarity(inst)
                if sim > self.cfg.similarity_threshold:
                    why = "rouge_similar"
            if why is None and len(accepted) >= need:
                why = "target_reached"
            if why is not None:
                self.state.counts[f"filter_{why}"] += 1
                row = {**cand, "reason": why}
                if idx is not None:
                    row.update(max_rouge_l=round(sim, 4), most_similar=self.pool.texts[idx])
                self._reject([row])
                continue
            task_id = f"{'alp' if self.cfg.variant == 'alpaca' else 'si'}-{len(self.state.machine) + len(accepted):06d}"
            cand.update(id=task_id, max_rouge_l=round(sim, 6),
                        most_similar=self.pool.texts[idx] if idx is not None else None,
                        most_similar_id=self.pool_ids[idx] if idx is not None else None)
            self.pool.add(inst)
            self.pool_ids.append(task_id)
            accepted.append(cand)
        self.state.counts["instructions_accepted"] += len(accepted)
        return accepted

    def _instances(self, tasks: list[dict], rng: random.Random) -> None:
        """Classification step and instance generation for self-instruct tasks (in place)."""
        cfg = self.cfg
        answers = self._generate([classify_prompt(self.classify_demos, t["instruction"]) for t in tasks],
                                 cfg.classify_sampling, 1)
        for t, a in zip(tasks, answers):
            verdict = parse_classification_answer(a.text) if a.error is None else None
            key = {True: "yes", False: "no", None: "unparsed"}[verdict]
            self.state.counts[f"classification_{key}"] += 1
            t["is_classification"] = bool(verdict)
            t["classification_answer"] = a.text.strip()[:20] if a.error is None else None
        replies = self._generate([instance_prompt(self.clf_demos if t["is_classification"] else self.gen_demos,
                                                  t["instruction"], t["is_classification"]) for t in tasks],
                                 cfg.instance_sampling, 2)
        for t, r in zip(tasks, replies):
            pairs = parse_instances(r.text, t["is_classification"]) if r.error is None else []
            if r.error is None and not pairs:
                self.state.counts["instance_replies_unparsed"] += 1
            t["_pairs"], t["_truncated"] = pairs, r.finish_reason == "length"

    def _round(self) -> tuple[list[dict], list[dict]]:
        cfg = self.cfg
        rng = random.Random(cfg.seed * 1_000_003 + self.state.round)
        need = cfg.num - len(self.state.machine)
        tasks = self._screen(self._candidates(rng), need)
        if cfg.variant == "self-instruct" and tasks:
            self._instances(tasks, rng)
        records = []
        for t in tasks:
            if cfg.variant == "alpaca":
                t["is_classification"] = None
                t["_pairs"], t["_truncated"] = [(t.pop("input"), t.pop("output"))], False
            self.state.counts["instances_parsed"] += len(t["_pairs"])
            kept, removed = filter_instances(t.pop("_pairs"), t.pop("_truncated"), cfg.max_instances, rng)
            for k, v in removed.items():
                self.state.counts[f"instance_{k}"] += v
            n_written = 0
            for inp, out in kept:
                key = (t["instruction"], inp, out)
                if key in self.seen:
                    self.state.counts["instance_duplicate_final"] += 1
                    continue
                self.seen.add(key)
                n_written += 1
                records.append(self._record(t, inp, out, removed, len(kept)))
            if not n_written:
                self.state.counts["tasks_without_instances"] += 1
                self._reject([{"instruction": t["instruction"], "id": t["id"], "reason": "no_instance_left",
                               "instance_filters": dict(removed)}])
            t["n_records"] = n_written
        return tasks, records

    def _record(self, t: dict, inp: str, out: str, removed: Counter, n_kept: int) -> dict:
        prov = {"generator": self.gen.describe(), "variant": self.cfg.variant, "round": self.state.round,
                "request": t["request"], "prompt_seed_ids": t["prompt_seed_ids"],
                "prompt_machine_ids": t["prompt_machine_ids"], "max_rouge_l": t["max_rouge_l"],
                "most_similar": t["most_similar"], "most_similar_id": t["most_similar_id"],
                "filters": {"instruction": "passed: 3 < words <= 150, no blacklisted keyword, ASCII and no "
                                           f"punctuation first, ROUGE-L {t['max_rouge_l']:.3f} <= "
                                           f"{self.cfg.similarity_threshold}",
                            "instances_kept_for_task": n_kept,
                            "instances_removed_for_task": dict(removed)}}
        if t.get("classification_answer") is not None:
            prov["classification_answer"] = t["classification_answer"]
        return {"instruction": t["instruction"], "input": inp, "output": out, "id": t["id"],
                "is_classification": t["is_classification"], "provenance": prov}

    def _commit(self, tasks: list[dict], records: list[dict]) -> None:
        """Append the round's records and rejections, then its progress line (the commit point)."""
        with open(self.out, "a", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
            f.flush()
            os.fsync(f.fileno())
        with open(self.paths["rejected"], "a", encoding="utf-8") as f:
            f.writelines(json.dumps({"round": self.state.round, **r}, ensure_ascii=False) + "\n"
                         for r in self._pending_rejected)
            f.flush()
            os.fsync(f.fileno())
        self.state.records += len(records)
        self.state.rejected += len(self._pending_rejected)
        self.state.idle_rounds = 0 if tasks else self.state.idle_rounds + 1
        keep = ("id", "instruction", "is_classification", "n_records")
        entry = {"round": self.state.round, "tasks": [{k: t.get(k) for k in keep} for t in tasks],
                 "counts": dict(self.state.counts), "records": self.state.records,
                 "rejected": self.state.rejected, "idle_rounds": self.state.idle_rounds, "time": time.time()}
        with open(self.paths["progress"], "a", encoding="utf-8") as f:
            f.write(json.dumps(entry, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.state.machine.extend(entry["tasks"])
        self.state.round += 1

    def summary(self, status: str) -> dict:
        c = self.state.counts
        s = {"status": status, "out": str(self.out), "variant": self.cfg.variant,
             "generator": self.gen.describe(), "seeds": str(self.seeds_path), "n_seeds": len(self.seeds),
             "rounds": self.state.round, "instructions": len(self.state.machine), "target": self.cfg.num,
             "records": self.state.records,
             "requests": {"sent": c["requests"], "failed_after_retries": c["requests_failed"],
                          "truncated_responses_dropped": c["truncated_responses_dropped"],
                          "truncated_items_dropped": c["truncated_items_dropped"],
                          "responses_without_items": c["responses_without_items"],
                          "unparsed_items": c["unparsed_items"]},
             "candidates": c["candidates"],
             "instruction_filters": {k: c[f"filter_{k}"] for k in INSTRUCTION_FILTERS + ("target_reached",)},
             "instructions_accepted": c["instructions_accepted"],
             "classification": {k: c[f"classification_{k}"] for k in ("yes", "no", "unparsed")},
             "instances_parsed": c["instances_parsed"], "instance_replies_unparsed": c["instance_replies_unparsed"],
             "instance_filters": {k: c[f"instance_{k}"] for k in INSTANCE_FILTERS},
             "tasks_without_instances": c["tasks_without_instances"],
             "files": {"records": str(self.out), **{k: str(v) for k, v in self.paths.items()}}}
        if isinstance(getattr(self.gen, "truncated_prompts", None), int):
            s["requests"]["prompts_cut_to_context"] = self.gen.truncated_prompts
        return s

    def run(self) -> dict:
        """Generate until ``cfg.num`` instructions (or patience/max_rounds runs out); returns the summary."""
        self._restore()
        self._start_progress()
        cfg = self.cfg
        status = "completed"
        t0 = time.perf_counter()
        while len(self.state.machine) < cfg.num:
            if cfg.max_rounds is not None and self.state.round >= cfg.max_rounds:
                status = "max_rounds"
                break
            if self.state.idle_rounds >= cfg.patience:
                status = "stalled"
                break
            self._pending_rejected: list[dict] = []
            tasks, records = self._round()
            self._commit(tasks, records)
            self.log(f"round {self.state.round - 1}: {len(tasks)} new instructions ({len(self.state.machine)}/"
                     f"{cfg.num}), {len(records)} records ({self.state.records} total), "
                     f"{time.perf_counter() - t0:.0f}s")
        summary = self.summary(status)
        if status == "stalled":
            self.log(f"stopped: {cfg.patience} rounds in a row added no instruction; see "
                     f"{self.paths['rejected']} for why candidates were removed")
        self.paths["summary"].write_text(json.dumps(summary, indent=2), encoding="utf-8")
        return summary


def run_self_instruct(seeds: str | Path, generator: Generator, out: str | Path,
                      cfg: SelfInstructConfig | None = None, log=None) -> dict:
    """Run (or resume) Self-Instruct; returns the summary (also written to ``OUT.summary.json``)."""
    return SelfInstruct(seeds, generator, out, cfg or SelfInstructConfig(), log=log).run()


def format_summary(s: dict) -> str:
    """A readable table of the summary for the terminal."""
    lines = [f"{s['status']}: {s['instructions']}/{s['target']} instructions, {s['records']} records in "
             f"{s['rounds']} rounds ({s['variant']}, generator {s['generator'].get('name')})",
             f"requests: {s['requests']['sent']} sent, {s['requests']['failed_after_retries']} failed after retries; "
             f"replies cut at the token limit: {s['requests']['truncated_responses_dropped']} dropped whole, "
             f"{s['requests']['truncated_items_dropped']} items lost; "
             f"{s['requests']['responses_without_items']} replies without items, "
             f"{s['requests']['unparsed_items']} unparsable items",
             f"candidate instructions: {s['candidates']}, accepted {s['instructions_accepted']}; removed by filter:"]
    lines += [f"  {k:22s} {v}" for k, v in s["instruction_filters"].items()]
    if s["variant"] == "self-instruct":
        c = s["classification"]
        lines.append(f"classification: {c['yes']} yes, {c['no']} no, {c['unparsed']} unparsed (treated as no)")
    lines.append(f"instances parsed: {s['instances_parsed']}; removed by filter:")
    lines += [f"  {k:22s} {v}" for k, v in s["instance_filters"].items()]
    lines.append(f"tasks left without instances: {s['tasks_without_instances']}")
    return "\n".join(lines)
