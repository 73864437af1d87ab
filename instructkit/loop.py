"""THE training loop, shared by every method.

A method hands the loop three things: the model, a deterministic source of micro-batches per epoch,
and a ``loss_fn(model, batch) -> StepOutput`` that returns a *summed* loss and its number of target
tokens. The loop owns everything else: AdamW, the LR schedule, gradient accumulation normalised by
the global target-token count, clipping, autocast, evaluation, logging, atomic checkpoints, exact
resume, signals and NaN detection. ``backward()`` is called in exactly one place: here.

Under torchrun the same loop runs on every rank (see :mod:`instructkit.distributed`): each rank
takes its share of every step's micro-batches, DDP or FSDP2 reduce the gradients, and only rank 0
logs and writes files.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from instructkit import distributed
from instructkit.config import TrainConfig
from instructkit.models import nll_sum
from instructkit.optim import MuonAdamW, make_optimizer

CKPT_PREFIX = "step-"


class TrainingError(RuntimeError):
    """The run cannot continue (non-finite loss, unusable checkpoint, ...)."""


@dataclass
class StepOutput:
    """What a method's loss function returns for one micro-batch.

    Attributes:
        loss_sum: Scalar tensor, the loss summed over target units (tokens for SFT).
        n_targets: Number of target units in this micro-batch (used for normalisation).
        metrics: Extra scalar metrics to average over the step, weighted by n_targets.
    """

    loss_sum: torch.Tensor
    n_targets: int
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class LoopResult:
    global_step: int
    status: str  # "completed" | "interrupted"
    last_checkpoint: Path | None
    final_metrics: dict[str, Any]


BatchSource = Callable[[int], Sequence[dict]]
"""Maps an epoch number to that epoch's micro-batches, always the same list for the same epoch."""


def start_run(output_dir: str | Path, seed: int) -> tuple[Path, torch.device]:
    """Create the run folder, seed Python's and torch's RNGs, and pick the device (CUDA if present)."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    random.seed(seed)
    torch.manual_seed(seed)
    return out, torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def nll_step(model: torch.nn.Module, batch: dict) -> StepOutput:
    """The causal-LM loss_fn (SFT, pretraining): summed NLL over the batch's target tokens."""
    return StepOutput(*nll_sum(model, batch))


@torch.no_grad()
def evaluate_steps(model: torch.nn.Module, loss_fn: Callable[[torch.nn.Module, dict], StepOutput],
                   batches: Sequence[dict], device: torch.device) -> dict[str, float]:
    """Held-out ``eval_loss`` and ``eval_<metric>`` of a method's own loss_fn, in eval mode.

    The loss is the summed loss over the global count of target units; each metric is weighted by
    its micro-batch's count, exactly as the training step averages them.
    """
    model.eval()
    n, loss_sum, sums = 0, 0.0, {}
    for b in batches:
        out = loss_fn(model, _to_device(b, device))
        n += out.n_targets
        loss_sum += float(out.loss_sum)
        for k, v in out.metrics.items():
            sums[k] = sums.get(k, 0.0) + float(v) * out.n_targets
    return {"eval_loss": loss_sum / max(1, n), **{f"eval_{k}": v / max(1, n) for k, v in sums.items()}}


def count_targets(batch: dict) -> int:
    """Target tokens in a causal-LM batch: labels that are not -100, after the one-token shift."""
    return int((batch["labels"][:, 1:] != -100).sum())


def lr_lambda(cfg: TrainConfig, total_steps: int) -> Callable[[int], float]:
    """Warmup then linear or cosine decay to ``min_lr_ratio`` of the peak, as a multiplier."""
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else int(cfg.warmup_ratio * total_steps)

    def fn(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        if cfg.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        if cfg.schedule == "linear":
            shape = 1.0 - progress
        else:
            shape = 0.5 * (1.0 + math.cos(math.pi * progress))
        return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * shape

    return fn


def plan_steps(cfg: TrainConfig, micro_per_epoch: int, world_size: int = 1) -> tuple[int, int]:
    """(optimizer steps per epoch, total optimizer steps) for this config, data size and rank count."""
    if micro_per_epoch <= 0:
        raise TrainingError("no training batches: the training data is empty after filtering")
    per_epoch = math.ceil(micro_per_epoch / (cfg.grad_accum * world_size))
    total = max(1, math.ceil(per_epoch * cfg.epochs))
    if cfg.max_steps is not None:
        total = cfg.max_steps
    return per_epoch, total


# ----------------------------------------------------------------------------------------------
# Checkpoints: a temporary folder renamed into place, so a kill mid-write never leaves a
# half-written checkpoint that resume would pick up. Under torchrun every rank takes part in
# gathering full (unsharded) tensors and rank 0 writes them: the files have the single-process
# layout, so any number of ranks and either strategy can resume from them.


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full trainable weights by name, on CPU. Under FSDP2 every rank must call it (each tensor is
    gathered in turn) and only rank 0 keeps them; the others get an empty dict."""
    keep = distributed.is_main_process()
    out = {}
    for n, p in model.named_parameters():
        if p.requires_grad:
            t = distributed.full_tensor(p.detach())
            if keep:
                out[n] = t.to("cpu", copy=True).contiguous()
    return out


def _rng_state() -> dict:
    rng = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
           "python_version": random.getstate()[0], "python_gauss": random.getstate()[2]}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def _set_rng_state(rng: dict) -> None:
    torch.set_rng_state(rng["torch"])
    random.setstate((rng["python_version"], tuple(rng["python"]), rng["python_gauss"]))
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def save_checkpoint(ckpt_root: Path, step: int, model: torch.nn.Module, optimizer, scheduler,
                    state: dict, keep_last: int) -> Path:
    from safetensors.torch import save_file

    final = ckpt_root / f"{CKPT_PREFIX}{step:08d}"
    weights = trainable_state(model)
    optim = distributed.full_optimizer_state(optimizer)  # None on ranks other than 0
    rngs = distributed.gather_objects(_rng_state())
    if not distributed.is_main_process():
        distributed.barrier()  # rank 0 is writing; nobody reads the folder before it is in place
        return final
    ckpt_root.mkdir(parents=True, exist_ok=True)
    tmp = ckpt_root / f".tmp-{CKPT_PREFIX}{step:08d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file(weights, str(tmp / "trainable.safetensors"))
    torch.save({"optimizer": optim, "scheduler": scheduler.state_dict()}, tmp / "optimizer.pt")
    # Rank 0's state at the top level (the single-process layout), every rank's under "ranks".
    torch.save({**rngs[0], "ranks": rngs} if len(rngs) > 1 else rngs[0], tmp / "rng.pt")
    (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2), encoding="utf-8")
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(ckpt_root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    distributed.barrier()
    return final


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    if not ckpt_root.exists():
        return []
    found = [p for p in ckpt_root.iterdir()
             if p.is_dir() and p.name.startswith(CKPT_PREFIX) and (p / "trainer_state.json").exists()]
    return sorted(found, key=lambda p: int(p.name[len(CKPT_PREFIX):]))


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer, scheduler) -> dict:
    from safetensors import safe_open

    # Tensor by tensor and memory-mapped: N ranks on a node must not each hold a full copy.
    with safe_open(str(path / "trainable.safetensors"), framework="pt") as weights:
        names = list(weights.keys())
        params = dict(model.named_parameters())
        missing = [n for n, p in params.items() if p.requires_grad and n not in names]
        unexpected = [n for n in names if n not in params]
        if missing or unexpected:
            raise TrainingError(
                f"checkpoint {path} does not match this model (missing {missing[:3]}, unexpected "
                f"{unexpected[:3]}); it was written by a different model or LoRA setting. Start a "
                f"new output_dir or set train.resume: false")
        with torch.no_grad():
            for n in names:
                params[n].copy_(distributed.local_like(weights.get_tensor(n), params[n]))
    opt = torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu", mmap=True)
    distributed.load_optimizer_state(optimizer, opt["optimizer"])
    scheduler.load_state_dict(opt["scheduler"])
    rng = torch.load(path / "rng.pt", weights_only=True)
    ranks = rng.get("ranks", [rng])
    if len(ranks) == distributed.world_size():
        _set_rng_state(ranks[distributed.rank()])
    elif distributed.is_main_process():
        # Another number of ranks: rank 0 continues its stream, the others keep their own seeds
        # (dropout masks then differ from an uninterrupted run; without dropout nothing changes).
        _set_rng_state(ranks[0])
    return json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))


# ----------------------------------------------------------------------------------------------
# Logging


def _step_of(line: str) -> int | None:
    """Step of a metrics line; None for a line cut short by a hard kill mid-write."""
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, AttributeError):
        return None


class MetricsLogger:
    """Appends one JSON object per line to ``metrics.jsonl`` (plus TensorBoard / W&B if asked)."""

    def __init__(self, path: Path, resume_step: int | None, tensorboard: bool = False,
                 wandb_project: str | None = None, run_config: dict | None = None, enabled: bool = True):
        self.path = path
        self.enabled = enabled
        self.tb = None
        self.wandb = None
        if not enabled:  # ranks other than 0 under torchrun
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and path.exists():
            # Drop lines written after the checkpoint we resume from, so the file reads as if the
            # run had never been interrupted.
            kept = [ln for ln in path.read_text(encoding="utf-8").splitlines()
                    if _step_of(ln) is not None and _step_of(ln) <= resume_step]
            path.write_text("".join(ln + "\n" for ln in kept), encoding="utf-8")
        elif resume_step is None and path.exists():
            path.unlink()
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(path.parent / "tensorboard"))
            except ImportError:
                print("warning: logging.tensorboard is on but tensorboard is not installed "
                      "(pip install tensorboard); continuing without it", file=sys.stderr)
        if wandb_project:
            try:
                import wandb
                self.wandb = wandb.init(project=wandb_project, config=run_config or {})
            except ImportError:
                print("warning: logging.wandb is on but wandb is not installed; continuing "
                      "without it", file=sys.stderr)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        step = record.get("step", 0)
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(record, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


class Progress:
    """A live bar with ETA in a terminal; periodic plain lines when output is piped."""

    def __init__(self, total: int, start: int, enabled: bool):
        self.total, self.enabled = total, enabled
        self.tty = enabled and sys.stderr.isatty()
        self.t0 = time.perf_counter()
        self.start = start
        self._bar = None
        if self.tty:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress as RichProgress,
                                       TextColumn, TimeElapsedColumn, TimeRemainingColumn)
            self._bar = RichProgress(TextColumn("train"), BarColumn(), MofNCompleteColumn(),
                                     TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                                     TextColumn("{task.fields[info]}"), transient=False)
            self._task = self._bar.add_task("train", total=total, completed=start, info="")
            self._bar.start()

    def update(self, step: int, info: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(self._task, completed=step, info=info)
            return
        every = max(1, self.total // 20)
        if step % every == 0 or step == self.total:
            done = step - self.start
            rate = done / max(1e-9, time.perf_counter() - self.t0)
            eta = (self.total - step) / rate if rate > 0 else float("nan")
            print(f"step {step}/{self.total} {info} eta {eta:.0f}s", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


# ----------------------------------------------------------------------------------------------


class _StopFlag:
    """SIGINT/SIGTERM set a flag; the loop finishes the current step, checkpoints and exits."""

    def __init__(self):
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self):
        for s in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread (e.g. called from a worker): no handlers
                pass
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:  # second signal: stop now
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\nreceived {signal.Signals(signum).name}: finishing this step, then saving a "
              f"checkpoint (send again to abort without saving)", file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


def _bf16_would_pay(model: torch.nn.Module, min_params: int = 20_000_000) -> bool:
    """A CPU with native bf16 (AMX or AVX512-BF16) and a model big enough for matmuls to dominate."""
    from instructkit.models import cpu_has_fast_bf16

    return sum(p.numel() for p in model.parameters()) >= min_params and cpu_has_fast_bf16()


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


def train_loop(
    *,
    model: torch.nn.Module,
    batches: BatchSource,
    micro_per_epoch: int,
    loss_fn: Callable[[torch.nn.Module, dict], StepOutput],
    cfg: TrainConfig,
    out_dir: Path,
    eval_fn: Callable[[torch.nn.Module], dict[str, float]] | None = None,
    count_fn: Callable[[dict], int] = count_targets,
    device: torch.device | None = None,
    run_config: dict | None = None,
    logging_cfg: Any = None,
    unit: str = "target_tokens",
) -> LoopResult:
    """Run optimisation to the end (or to a signal), with exact resume from ``out_dir/checkpoints``.

    Args:
        model: Module with trainable parameters (full model or peft-wrapped).
        batches: ``epoch -> micro-batches``; must return the same list for the same epoch, which is
            what makes resume exact. A source whose state carries over epochs may also have
            ``state_dict() -> JSON-able dict`` (saved in every checkpoint) and ``load_state_dict(d)``
            (called on resume, before the first ``batches(epoch)``).
        micro_per_epoch: ``len(batches(e))`` (equal for every epoch).
        loss_fn: ``(model, micro_batch) -> StepOutput`` with a summed loss.
        cfg: The ``train`` section.
        out_dir: Run folder; ``metrics.jsonl`` and ``checkpoints/`` are written here.
        eval_fn: Optional ``model -> {"eval_loss": ...}``, called every ``cfg.eval_every`` steps and
            at the end.
        count_fn: Counts target units of a micro-batch before the forward pass, so every
            micro-batch is scaled by the global count of the whole optimizer step.
        device: Where to run; batches are moved there.
        run_config: Resolved config, passed to W&B.
        logging_cfg: The ``logging`` section (TensorBoard / W&B switches).
        unit: What ``count_fn`` counts, for the throughput metric ``{unit}_per_s`` (e.g. ``pairs``).

    Returns:
        A LoopResult. ``status == "interrupted"`` when a signal stopped the run after saving.

    Raises:
        TrainingError: On a non-finite loss (naming the step and the last checkpoint).
    """
    device = device or next(model.parameters()).device
    out_dir = Path(out_dir)
    ckpt_root = out_dir / "checkpoints"
    # Wrap first: FSDP2 replaces the parameters with shards, and the optimizer must hold those.
    engine = distributed.Engine(model, distributed.active())
    rank, world = engine.rank, engine.world
    main = rank == 0
    per_step = cfg.grad_accum * world  # micro-batches per optimizer step, over all ranks
    per_epoch, total_steps = plan_steps(cfg, micro_per_epoch, world)
    optimizer = make_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps))

    state = {"global_step": 0, "epoch": 0, "group_in_epoch": 0, "tokens_seen": 0,
             "total_steps": total_steps, "micro_batches_per_step": per_step, "world_size": world}
    resume_step = None
    last_ckpt: Path | None = None
    existing = list_checkpoints(ckpt_root)
    if cfg.resume:
        # Rank 0 decides which checkpoint, so every rank loads the same one.
        last_ckpt = distributed.broadcast_object(existing[-1] if existing else None)
        if last_ckpt is not None:
            saved = json.loads((last_ckpt / "trainer_state.json").read_text(encoding="utf-8"))
            _check_same_global_batch(saved, cfg, world, last_ckpt)
            loaded = load_checkpoint(last_ckpt, model, optimizer, scheduler)
            source_state = loaded.pop("source", None)
            if source_state is not None and hasattr(batches, "load_state_dict"):
                batches.load_state_dict(source_state)
            state.update(loaded, micro_batches_per_step=per_step, world_size=world)
            if state["group_in_epoch"] >= per_epoch:
                # Saved after the epoch's last step: go straight to the next one instead of asking the
                # source for a finished epoch again (an RL source would sample a rollout for nothing).
                state["epoch"] += 1
                state["group_in_epoch"] = 0
            resume_step = state["global_step"]
            if main:
                print(f"resuming from {last_ckpt} (step {resume_step})", file=sys.stderr)
        elif main:
            print(f"train.resume is on but {ckpt_root} has no checkpoint; starting from step 0",
                  file=sys.stderr)
    elif existing and main:
        # Old checkpoints from a previous run would otherwise be mixed with this one's.
        for p in existing:
            shutil.rmtree(p)
    distributed.barrier()

    lc = logging_cfg
    logger = MetricsLogger(out_dir / "metrics.jsonl", resume_step,
                           tensorboard=bool(lc and lc.tensorboard),
                           wandb_project=(lc.wandb_project if lc and lc.wandb else None),
                           run_config=run_config, enabled=main)
    use_bf16 = cfg.bf16 is True or (cfg.bf16 == "auto" and device.type == "cuda"
                                    and torch.cuda.is_bf16_supported())
    autocast = (lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)) if use_bf16 \
        else nullcontext
    if main and device.type == "cpu" and not use_bf16 and cfg.bf16 == "auto" and _bf16_would_pay(model):
        print("note: this CPU has native bf16 units (AMX or AVX512-BF16); train.bf16: true (bf16 autocast, "
              "fp32 master weights) trains a model this size about 1.6-2x faster here", file=sys.stderr)
    progress = Progress(total_steps, state["global_step"], cfg.progress and main)
    trainable = [p for p in model.parameters() if p.requires_grad]
    model.train()
    status = "completed"
    last_metrics: dict[str, Any] = {}

    def checkpoint() -> Path:
        # A source with state that evolves over epochs (e.g. PPO's adaptive KL coefficient) saves it too.
        extra = {"source": batches.state_dict()} if hasattr(batches, "state_dict") else {}
        return save_checkpoint(ckpt_root, state["global_step"], model, optimizer, scheduler,
                               {**state, **extra}, cfg.keep_last)

    def evaluate() -> dict[str, float]:
        with engine.full_parameters():
            metrics = eval_fn(model)
        model.train()
        return metrics

    try:
        with _StopFlag() as stop:
            step_t0 = time.perf_counter()
            while state["global_step"] < total_steps:
                epoch = state["epoch"]
                with engine.full_parameters():  # a source may run the model (RL rollouts)
                    micro = batches(epoch)
                groups = [micro[i:i + per_step] for i in range(0, len(micro), per_step)]
                for gi in range(state["group_in_epoch"], len(groups)):
                    if state["global_step"] >= total_steps:
                        break
                    group = groups[gi]
                    # Normalising every micro-batch by the step's global target count makes
                    # accumulation over k micro-batches (on any number of ranks) identical to one
                    # batch k times larger. Every rank holds the whole step, so no communication.
                    n_global = sum(count_fn(b) for b in group)
                    scale = engine.grad_scale / max(1, n_global)
                    mine = distributed.shard_step(group, rank, world)
                    loss_local, metric_sums = 0.0, {}
                    for j, (b, counts) in enumerate(mine):
                        b = _to_device(b, device)
                        with engine.accumulating(sync=j == len(mine) - 1):
                            with autocast():
                                out = engine.forward(loss_fn, b)
                            (out.loss_sum * (scale if counts else 0.0)).backward()
                        weight = out.n_targets if counts else 0
                        loss_local += float(out.loss_sum.detach()) if counts else 0.0
                        for k, v in out.metrics.items():
                            metric_sums[k] = metric_sums.get(k, 0.0) + float(v) * weight
                    # One small all-reduce: the loss, the metrics and whether any rank got a signal.
                    keys = sorted(metric_sums)
                    totals = distributed.all_reduce_sum(
                        [loss_local, float(stop.signum is not None), *(metric_sums[k] for k in keys)])
                    loss = totals[0] / max(1, n_global)
                    stop_now = totals[1] > 0
                    step_no = state["global_step"] + 1
                    if not math.isfinite(loss):
                        optimizer.zero_grad(set_to_none=True)
                        where = f"last checkpoint: {last_ckpt}" if last_ckpt else "no checkpoint yet"
                        raise TrainingError(
                            f"loss is {loss} at step {step_no} (epoch {epoch}); the weights were "
                            f"not updated. {where}. Lower train.lr, check the data, or enable "
                            f"train.max_grad_norm, then resume with --resume")
                    # With no limit the clip factor is exactly 1: this only measures the norm.
                    gnorm = float(distributed.full_tensor(torch.nn.utils.clip_grad_norm_(
                        trainable, cfg.max_grad_norm if cfg.max_grad_norm is not None else math.inf)))
                    lrs = scheduler.get_last_lr()  # AdamW's groups first, Muon's last (optim.MuonAdamW)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)

                    state["global_step"] = step_no
                    state["group_in_epoch"] = gi + 1
                    state["tokens_seen"] += n_global
                    now = time.perf_counter()
                    record = {"step": step_no, "epoch": round(epoch + (gi + 1) / len(groups), 4),
                              "loss": loss, "lr": lrs[0], "grad_norm": gnorm,
                              f"{unit}_per_s": n_global / max(1e-9, now - step_t0),
                              "tokens_seen": state["tokens_seen"]}
                    if isinstance(optimizer, MuonAdamW):
                        record["muon_lr"] = lrs[-1]
                    for k, v in zip(keys, totals[2:]):
                        record[k] = v / max(1, n_global)
                    if eval_fn is not None and cfg.eval_every and step_no % cfg.eval_every == 0:
                        record.update(evaluate())
                    if step_no % cfg.log_every == 0 or step_no == total_steps:
                        logger.log(record)
                    last_metrics = record
                    progress.update(step_no, f"loss {loss:.4f} lr {lrs[0]:.2e}")
                    if cfg.save_every and step_no % cfg.save_every == 0:
                        last_ckpt = checkpoint()
                    if stop_now:
                        if last_ckpt is None or not last_ckpt.name.endswith(f"{step_no:08d}"):
                            last_ckpt = checkpoint()
                        status = "interrupted"
                        break
                    step_t0 = time.perf_counter()
                if status == "interrupted":
                    break
                if state["group_in_epoch"] >= len(groups):
                    state["epoch"] += 1
                    state["group_in_epoch"] = 0
            if status == "completed" and eval_fn is not None and not (
                    cfg.eval_every and state["global_step"] % cfg.eval_every == 0):
                final_eval = evaluate()
                last_metrics = {**last_metrics, **final_eval}
                logger.log({"step": state["global_step"], **final_eval})
    finally:
        progress.close()
        logger.close()
    if status == "interrupted" and main:
        print(f"interrupted at step {state['global_step']}; checkpoint {last_ckpt}. "
              f"Resume with: instructkit train {out_dir / 'config.yaml'} --resume", file=sys.stderr)
    return LoopResult(state["global_step"], status, last_ckpt, last_metrics)


def _check_same_global_batch(saved: dict, cfg: TrainConfig, world: int, path: Path) -> None:
    """Exact resume needs the same micro-batches per step; say how to get them back if not."""
    before = saved.get("micro_batches_per_step", cfg.grad_accum)
    now = cfg.grad_accum * world
    if before == now:
        return
    ranks = saved.get("world_size", 1)
    fix = (f"Set train.grad_accum={before // world} to keep the global batch" if before % world == 0
           else f"Use a number of ranks that divides {before}")
    raise TrainingError(
        f"checkpoint {path} was written with {before} micro-batches per optimizer step ({ranks} rank(s) "
        f"x grad_accum {before // max(1, ranks)}); this run has {now} ({world} rank(s) x grad_accum "
        f"{cfg.grad_accum}), which would change the global batch and the data position. {fix}, or "
        f"start a new output_dir")
