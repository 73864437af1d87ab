"""What online RL methods (GRPO, PPO) share: prompts, rewards, sampling completions, the reference,
per-token log-probs of completions, rollout telemetry and alarms.

A *rollout* is a list of prompts answered by the current policy. Its completions become right-padded
micro-batches: ``input_ids``/``labels`` (prompt + completion, labels only on completion tokens, the
layout of :func:`instructkit.models.target_logits`) plus ``completion_mask`` (B, T), 1 on each row's
completion tokens, so per-token quantities live in (B, T) tensors aligned with it.
"""

from __future__ import annotations

import copy
import importlib
import json
import math
import random
import sys
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from instructkit.config import ConfigError, RunConfig
from instructkit.data.encode import EncodedExample, encode_prompt
from instructkit.data.errors import DataError
from instructkit.data.packing import collate_padded
from instructkit.data.pipeline import as_list
from instructkit.distributed import is_main_process, world_size
from instructkit.generate import Generation, SamplingConfig, generate
from instructkit.loop import plan_steps
from instructkit.losses import token_logprobs
from instructkit.models import target_logits

# reward(records, prompt_messages, completion_texts) -> one float per completion
RewardFn = Callable[[list[dict], list[list[dict]], list[str]], list[float]]


# ----------------------------------------------------------------------------------------------
# Prompts


def prompt_messages(record: dict, file: str, line: int) -> list[dict]:
    """The conversation to answer: ``messages`` without its final assistant turns, or ``prompt`` as a user turn."""
    if isinstance(record.get("messages"), list) and record["messages"]:
        msgs = list(record["messages"])
        while msgs and isinstance(msgs[-1], dict) and msgs[-1].get("role") == "assistant":
            msgs.pop()
        if msgs:
            return msgs
        raise DataError(file, line, "messages", "holds only assistant turns, so there is no prompt",
                        "end the conversation with a user turn", reason="no_prompt")
    if isinstance(record.get("prompt"), str) and record["prompt"].strip():
        return [{"role": "user", "content": record["prompt"]}]
    raise DataError(file, line, None, "has neither a 'messages' list nor a 'prompt' string",
                    "give each record messages (OpenAI style) or a prompt", reason="missing_field")


@dataclass
class Prompts:
    records: list[dict]
    messages: list[list[dict]]
    ids: list[list[int]]
    skipped: int = 0

    def __len__(self) -> int:
        return len(self.ids)

    def head(self, n: int) -> "Prompts":
        return Prompts(self.records[:n], self.messages[:n], self.ids[:n], self.skipped)

    def pick(self, indices: list[int]) -> "Prompts":
        return Prompts([self.records[i] for i in indices], [self.messages[i] for i in indices],
                       [self.ids[i] for i in indices], self.skipped)


def load_prompts(files: list[str], tokenizer, template: str, limit: int, on_error: str,
                 check: Callable[[dict, str, int], None] | None = None) -> Prompts:
    """Records of JSONL files and their encoded prompts.

    Prompts longer than ``limit`` tokens, and records the reward cannot score (``check``), are errors,
    or with ``on_error: skip`` skipped and counted.
    """
    out = Prompts([], [], [])
    for f in files:
        path = Path(f)
        if not path.exists():
            raise DataError(f, None, None, "file not found", "check data.train / data.eval")
        for i, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not raw.strip():
                continue
            try:
                try:
                    rec = json.loads(raw)
                except json.JSONDecodeError as e:
                    raise DataError(f, i, None, f"not valid JSON ({e.msg})", "write one JSON object per line",
                                    reason="bad_json") from None
                if not isinstance(rec, dict):
                    raise DataError(f, i, None, "is not a JSON object", "write one JSON object per line")
                if check is not None:
                    check(rec, f, i)
                msgs = prompt_messages(rec, f, i)
                ids = encode_prompt(tokenizer, msgs, template=template)
                if len(ids) > limit:
                    raise DataError(f, i, "messages", f"prompt has {len(ids)} tokens, more than data.max_length - "
                                    f"rl.max_new_tokens = {limit}", "raise data.max_length or lower "
                                    "rl.max_new_tokens (data.on_error: skip skips such prompts)", reason="too_long")
            except DataError:
                if on_error != "skip":
                    raise
                out.skipped += 1
                continue
            out.records.append(rec)
            out.messages.append(msgs)
            out.ids.append(ids)
    return out


def prompt_indices(n: int, per_rollout: int, rollout: int, seed: int,
                   perms: dict[int, list[int]] | None = None) -> list[int]:
    """Prompts of rollout number ``rollout``: consecutive slices of a fresh shuffle per pass over the data.
    ``perms`` caches the shuffles across calls (pass the same dict to walk many rollouts cheaply)."""
    out, perms = [], {} if perms is None else perms
    for pos in range(rollout * per_rollout, (rollout + 1) * per_rollout):
        k = pos // n
        if k not in perms:
            perms[k] = list(range(n))
            random.Random(f"rollout/{seed}/{k}").shuffle(perms[k])
        out.append(perms[k][pos % n])
    return out


def probe_indices(n: int, cfg: RunConfig, n_rollouts: int, size: int) -> list[int]:
    """``size`` training prompts the run will surely train on: those of each rollout's first sampling round
    (slot ``rollout * rl.sampling_rounds``), in order of first draw, taken evenly from the first drawn to the
    last, so the probe holds prompts trained on early and late."""
    rl, perms = cfg.rl, {}
    drawn, seen = [], set()
    for e in range(n_rollouts):
        for i in prompt_indices(n, rl.prompts_per_rollout, e * rl.sampling_rounds, cfg.seed, perms):
            if i not in seen:
                seen.add(i)
                drawn.append(i)
        if len(seen) == n:
            break
    if len(drawn) <= size:
        return drawn
    return [drawn[k * (len(drawn) - 1) // max(1, size - 1)] for k in range(size)]  # the first and the last drawn


# ----------------------------------------------------------------------------------------------
# Rewards


def _check_skills_record(rec: dict, file: str, line: int) -> None:
    from instructkit.synth.skills import FAMILIES

    if rec.get("family") not in FAMILIES or not isinstance(rec.get("data"), dict):
        raise DataError(file, line, "family", f"rl.reward: skills needs a known 'family' and a 'data' object, got "
                        f"family={rec.get('family')!r}", "use files written by `instructkit synth skills`, or set "
                        "rl.reward to a module:function", reason="not_skills")


def load_rl_data(cfg: RunConfig, tokenizer, template: str):
    """``(reward_fn, train_prompts, eval_prompts)`` for an RL run, with the data summary printed.

    Prompts leave ``rl.max_new_tokens`` of room in ``data.max_length``; eval prompts are capped at
    ``rl.eval_prompts``. Raises DataError when no training prompt is usable.
    """
    rl = cfg.rl
    reward_fn, check = load_reward(rl.reward, cfg.data.max_length)
    limit = cfg.data.max_length - rl.max_new_tokens
    prompts = load_prompts(as_list(cfg.data.train), tokenizer, template, limit, cfg.data.on_error, check)
    evals = load_prompts(as_list(cfg.data.eval), tokenizer, template, limit, cfg.data.on_error, check)
    evals = evals.head(rl.eval_prompts)
    if not len(prompts):
        raise DataError(str(cfg.data.train), None, None, "no usable prompt", "check data.train")
    skipped = prompts.skipped + evals.skipped
    print(f"data: {len(prompts)} train / {len(evals)} eval prompts, {skipped} skipped"
          f"{' (data.on_error: skip)' if skipped else ''}; reward {rl.reward}", file=sys.stderr)
    return reward_fn, prompts, evals


def load_reward(spec: str, max_length: int = 1024) -> tuple[RewardFn, Callable | None]:
    """``(reward_fn, record_check)`` for ``rl.reward``: ``skills``, ``module:function`` or a reward-model folder."""
    if spec == "skills":
        from instructkit.synth.skills import verify_response

        return (lambda recs, msgs, texts: [float(verify_response(r, t)) for r, t in zip(recs, texts)]), \
            _check_skills_record
    if Path(spec).is_dir():
        from instructkit.evaluate.reward import load_reward_model, score_responses

        rm, rtok = load_reward_model(spec)
        return (lambda recs, msgs, texts: score_responses(rm, rtok, msgs, texts, max_length=max_length)), None
    if ":" not in spec:
        raise ConfigError(f"rl.reward={spec!r}: use 'skills', a reward-model folder (method: reward writes one) or "
                          f"'module:function' (a function f(record, completion) -> float)")
    mod, name = spec.split(":", 1)
    try:
        fn = getattr(importlib.import_module(mod), name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"rl.reward={spec!r}: cannot import {name} from {mod}: {e}") from None
    if not callable(fn):
        raise ConfigError(f"rl.reward={spec!r} is not callable")
    return (lambda recs, msgs, texts: [float(fn(r, t)) for r, t in zip(recs, texts)]), None


# ----------------------------------------------------------------------------------------------
# Log-probs and the reference


def adapters_off(model):
    return model.disable_adapter() if hasattr(model, "disable_adapter") else nullcontext()


def scatter_completion(flat: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(N,) per-token values in row-major completion order -> (B, T) with 0 at padding (differentiable)."""
    return torch.zeros(mask.shape, dtype=flat.dtype, device=flat.device).masked_scatter(mask.bool(), flat)


def tempered(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Logits of the distribution rollouts sample from: ``logits / rl.temperature``.

    Ratios, KL terms and the policy gradient are taken on the sampling distribution itself (as TRL and
    verl do), so a run at T = 0.7 optimises the T = 0.7 policy it samples rather than the T = 1 one.
    """
    return logits if temperature == 1.0 else logits / temperature


@torch.no_grad()
def completion_logps(model, batch: dict, temperature: float = 1.0) -> torch.Tensor:
    """(B, T) log-probs of each row's completion tokens at ``temperature`` (0 at padding), no gradient."""
    logits, targets = target_logits(model, batch)
    return scatter_completion(token_logprobs(tempered(logits, temperature), targets), batch["completion_mask"])


def make_reference(model, cfg: RunConfig):
    """``batch -> (B, T) reference log-probs``: adapters disabled under LoRA, otherwise a frozen copy of the
    initial weights; None when ``rl.kl_coef`` is 0 (no reference in memory). Log-probs are at
    ``rl.temperature``, like the policy's."""
    if cfg.rl.kl_coef == 0:
        return None
    t = cfg.rl.temperature
    if cfg.lora.enabled:
        def ref(batch):
            with adapters_off(model):
                return completion_logps(model, batch, t)
        return ref
    frozen = copy.deepcopy(model).eval()
    for p in frozen.parameters():
        p.requires_grad_(False)
    return lambda batch: completion_logps(frozen, batch, t)


# ----------------------------------------------------------------------------------------------
# Sampling and batching


def sample(model, tokenizer, prompt_ids: list[list[int]], cfg: RunConfig, rollout: int, batch_size: int) -> list[Generation]:
    """Completions of the current policy, seeded by (seed, rollout) so a resumed run repeats them."""
    rl = cfg.rl
    sampling = SamplingConfig(max_new_tokens=rl.max_new_tokens, temperature=rl.temperature, top_k=rl.top_k,
                              top_p=rl.top_p, seed=cfg.seed * 1_000_003 + rollout)
    return generate(model, tokenizer, prompt_ids, sampling, batch_size=batch_size)


def micro_batches(prompt_ids: list[list[int]], gens: list[Generation], size: int, pad_id: int) -> list[dict]:
    """Right-padded micro-batches of prompt + completion, labels on completion tokens, ``completion_mask``."""
    out = []
    for s in range(0, len(gens), size):
        g = gens[s:s + size]
        ex = [EncodedExample(p + x.token_ids, [-100] * len(p) + x.token_ids) for p, x in zip(prompt_ids[s:s + size], g)]
        b = collate_padded(ex, pad_id=pad_id)
        T = max(len(x.token_ids) for x in g)
        b["completion_mask"] = torch.tensor([[1] * len(x.token_ids) + [0] * (T - len(x.token_ids)) for x in g],
                                            dtype=torch.long)
        out.append(b)
    return out


def n_micro(n_sequences: int, size: int) -> int:
    return math.ceil(n_sequences / size)


def steps_note(cfg: RunConfig, micro_per_rollout: int) -> str:
    """``", N optimizer steps per rollout"`` for a method's start line.

    Each Adam step moves the policy about as far as the learning rate allows, whatever the rollout's
    size, so steps x rollouts sets how far a run goes: at LoRA lr 1e-3, PPO with 2-8 steps per rollout
    (120-480 steps) unlearned memorised training answers that one step per rollout (60) kept
    (bench/RESULTS.md, "Online RL: PPO's lost training answers come from its optimizer steps").
    """
    per_rollout, _ = plan_steps(cfg.train, micro_per_rollout, world_size())
    return f", {per_rollout} optimizer step{'s' if per_rollout != 1 else ''} per rollout"


# ----------------------------------------------------------------------------------------------
# Telemetry


def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    """Pearson correlation; 0 when either side is constant."""
    x, y = x.float() - x.float().mean(), y.float() - y.float().mean()
    denom = float(x.norm() * y.norm())
    return float((x * y).sum()) / denom if denom > 0 else 0.0


def completion_stats(rewards: torch.Tensor, gens: list[Generation]) -> dict[str, float]:
    """Reward and length telemetry of a rollout (population std)."""
    lengths = torch.tensor([len(g.token_ids) for g in gens], dtype=torch.float32)
    stopped = torch.tensor([g.finish_reason == "stop" for g in gens], dtype=torch.float32)
    return {"reward_mean": float(rewards.mean()), "reward_std": float(rewards.std(unbiased=False)),
            "completion_len_mean": float(lengths.mean()), "completion_len_std": float(lengths.std(unbiased=False)),
            "completion_len_max": float(lengths.max()), "stop_fraction": float(stopped.mean()),
            "truncated_fraction": float(1.0 - stopped.mean()), "reward_length_corr": pearson(rewards, lengths)}


def check_alarms(cfg: RunConfig, rollout: int, m: dict, trend: "LengthTrend | None" = None) -> None:
    """Reward-hacking alarms: added to ``m`` as 0/1 metrics (logged with every step), printed when raised."""
    rl = cfg.rl
    if trend is not None:
        trend.check(rollout, m)
    checks = {"alarm_kl": (rl.alarm_kl, m.get("kl_ref"), "mean per-token KL to the reference"),
              "alarm_truncated": (rl.alarm_truncated, m.get("truncated_fraction"),
                                  "fraction of completions that hit rl.max_new_tokens")}
    for key, (bound, value, what) in checks.items():
        if bound is None or value is None:
            continue
        m[key] = float(value > bound)
        if value > bound and is_main_process():
            print(f"warning: rollout {rollout}: {what} is {value:.3f}, above the alarm bound {bound} "
                  f"(rl.{key})", file=sys.stderr)


class CarriedState:
    """Resume support for an RL batch source: what carries over from one rollout to the next.

    The loop saves ``state_dict()`` in every checkpoint and hands it to ``load_state_dict`` on resume.
    It holds the carried values twice: as they were before the last built rollout, and after it. A
    resume inside that rollout re-builds it from the "before" values; a resume at its end (the loop then
    asks for the next rollout) continues from the "after" values, as an uninterrupted run would.
    Subclasses call ``_begin_rollout(epoch)`` first thing when building a rollout and extend
    ``carried`` / ``restore_carried``.
    """

    trend: LengthTrend
    _built: int | None = None
    _before: dict | None = None
    _pending: dict | None = None

    def carried(self) -> dict:
        return {"length_history": [list(x) for x in self.trend.history]}

    def restore_carried(self, d: dict) -> None:
        self.trend.history = [tuple(x) for x in d["length_history"]]

    def state_dict(self) -> dict:
        return {"rollout": self._built, "before": self._before, "after": self.carried()}

    def load_state_dict(self, d: dict) -> None:
        self._pending = d

    def _begin_rollout(self, epoch: int) -> None:
        d, self._pending = self._pending, None
        if d is not None and d["rollout"] is not None:
            self.restore_carried(d["before"] if epoch == d["rollout"] else d["after"])
        self._built, self._before = epoch, self.carried()


class LengthTrend:
    """Alarm for length hacking: completions grow while the reward does not.

    Compares the mean completion length and reward of the last ``window`` rollouts with the
    ``window`` before them; raised when length grew by more than ``bound`` (a fraction) and the
    reward did not rise.
    """

    def __init__(self, bound: float | None, window: int = 5):
        self.bound, self.window = bound, window
        self.history: list[tuple[float, float]] = []

    def check(self, rollout: int, m: dict) -> None:
        if self.bound is None:
            return
        self.history.append((m["completion_len_mean"], m["reward_mean"]))
        w = self.window
        raised = False
        if len(self.history) >= 2 * w:
            prev, last = self.history[-2 * w:-w], self.history[-w:]
            len_prev, len_last = sum(x[0] for x in prev) / w, sum(x[0] for x in last) / w
            rew_prev, rew_last = sum(x[1] for x in prev) / w, sum(x[1] for x in last) / w
            raised = len_last > len_prev * (1 + self.bound) and rew_last <= rew_prev
            if raised and is_main_process():
                print(f"warning: rollout {rollout}: mean completion length rose from {len_prev:.1f} to {len_last:.1f} "
                      f"tokens over the last {w} rollouts while mean reward went from {rew_prev:.3f} to "
                      f"{rew_last:.3f} (rl.alarm_length_growth)", file=sys.stderr)
        m["alarm_length_growth"] = float(raised)


@torch.no_grad()
def score_prompts(model, tokenizer, prompts: Prompts, reward_fn: RewardFn, cfg: RunConfig, samples: int = 0,
                  batch_size: int = 16) -> tuple[list[float], float]:
    """``(reward per prompt, mean completion length)``. ``samples`` 0: one greedy completion per prompt (for
    the skills verifier, exact match). Otherwise the mean over ``samples`` completions drawn like the rollouts'
    (``rl.temperature``, top-k, top-p) with one fixed seed, so two calls on different policies share their
    random numbers and their difference is less noisy."""
    rl, k = cfg.rl, max(1, samples)
    ids = [x for x in prompts.ids for _ in range(k)]
    rep = [i for i in range(len(prompts)) for _ in range(k)]
    sampling = (SamplingConfig(max_new_tokens=rl.max_new_tokens, temperature=rl.temperature, top_k=rl.top_k,
                               top_p=rl.top_p, seed=cfg.seed * 1_000_003 + 999_983) if samples
                else SamplingConfig(max_new_tokens=rl.max_new_tokens))
    gens = generate(model, tokenizer, ids, sampling, batch_size=batch_size)
    r = reward_fn([prompts.records[i] for i in rep], [prompts.messages[i] for i in rep], [g.text for g in gens])
    per_prompt = [sum(r[i * k:(i + 1) * k]) / k for i in range(len(prompts))]
    return per_prompt, sum(len(g.token_ids) for g in gens) / len(gens)


def paired_se(start: list[float], end: list[float]) -> float:
    """Standard error of the mean per-prompt difference ``end - start`` (0 for fewer than two prompts)."""
    n = len(start)
    if n < 2:
        return 0.0
    d = [b - a for a, b in zip(start, end)]
    mean = sum(d) / n
    return math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1) / n)


def rl_evaluation(model, tokenizer, prompts: Prompts, evals: Prompts, reward_fn: RewardFn,
                  cfg: RunConfig, micro_per_rollout: int) -> tuple[Callable | None, dict]:
    """``(eval_fn, start)`` for an RL run.

    ``eval_fn`` (None when there is nothing to evaluate) reports ``eval_reward`` (greedy) on the eval prompts
    and ``train_reward`` on the train probe: ``rl.train_probe_prompts`` training prompts that the run's
    rollouts draw (:func:`probe_indices`), scored with ``rl.train_probe_samples`` sampled completions each
    (0 = greedy). Unlike the rollout reward it does not depend on which prompts a rollout happens to draw.
    Each comes with ``*_delta_se``, the standard error of its change since the start (paired by prompt).
    ``start`` holds ``eval_reward_start`` and ``train_reward_start``, the same scores for the initial policy
    taken now and printed (each only when its prompts exist), and ``train_probe_size``.
    """
    rl, batch_size = cfg.rl, max(16, cfg.train.micro_batch_size)
    probe = Prompts([], [], [])
    if rl.train_probe_prompts:
        per_rollout, total = plan_steps(cfg.train, micro_per_rollout, world_size())
        probe = prompts.pick(probe_indices(len(prompts), cfg, math.ceil(total / per_rollout), rl.train_probe_prompts))
    sets = {"eval": (evals, 0), "train": (probe, rl.train_probe_samples)}
    sets = {name: v for name, v in sets.items() if len(v[0])}
    if not sets:
        return None, {}
    first = {name: score_prompts(model, tokenizer, ps, reward_fn, cfg, k, batch_size)[0]
             for name, (ps, k) in sets.items()}

    def evaluate(m) -> dict[str, float]:
        out = {}
        for name, (ps, k) in sets.items():
            per_prompt, length = score_prompts(m, tokenizer, ps, reward_fn, cfg, k, batch_size)
            out.update({f"{name}_reward": sum(per_prompt) / len(per_prompt), f"{name}_completion_len": length,
                        f"{name}_reward_delta_se": paired_se(first[name], per_prompt)})
        return out

    start = {f"{name}_reward_start": sum(r) / len(r) for name, r in first.items()}
    if len(probe):
        start["train_probe_size"] = len(probe)
    if is_main_process() and "eval" in sets:
        print(f"before training: eval reward {start['eval_reward_start']:.3f} on {len(evals)} eval prompts (greedy)",
              file=sys.stderr)
    if is_main_process() and "train" in sets:
        how = (f"{rl.train_probe_samples} samples each at temperature {rl.temperature}" if rl.train_probe_samples
               else "greedy")
        print(f"before training: train-probe reward {start['train_reward_start']:.3f} on {len(probe)} of the run's "
              f"training prompts ({how})", file=sys.stderr)
    return evaluate, start


def format_change(start: float, end: float, se: float | None, fmt: str = ".3f") -> str:
    """``"0.189 -> 0.246 (+5.7 +- 0.8 points)"``: a score before -> after training, its change in points and the
    change's standard error."""
    return f"{start:{fmt}} -> {end:{fmt}} ({100 * (end - start):+.1f} +- {100 * (se or 0.0):.1f} points)"


def eval_summary(final_metrics: dict, start: dict) -> str:
    """The evaluation part of an RL run's closing line: eval and train-probe reward, start -> end (change
    +- its paired standard error)."""
    fm, out = final_metrics, ""
    for key, name in (("eval_reward", "eval reward"), ("train_reward", "train-probe reward")):
        if key in fm:
            out += f", {name} " + (format_change(start[key + "_start"], fm[key], fm.get(key + "_delta_se"))
                                   if key + "_start" in start else f"{fm[key]:.3f}")
    return out
