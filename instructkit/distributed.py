"""Multi-process training on PyTorch's own distributed engine: torchrun, DDP and FSDP2.

Nothing here launches processes or moves bytes by itself: ``torchrun`` (``torch.distributed.run``)
starts one process per device and sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``; this module joins
the process group, wraps the model (``DistributedDataParallel`` or ``fully_shard``), picks each
rank's micro-batches, and gathers full tensors for checkpoints so they load with any number of
ranks. Without torchrun every function is a cheap no-op and the loop runs as a single process.

How the data is split: every rank builds the same deterministic list of micro-batches for an epoch.
One optimizer step takes ``grad_accum * world_size`` consecutive micro-batches and rank ``r`` runs
every ``world_size``-th one starting at ``r``. So 1 process with ``grad_accum: 2`` and 2 processes
with ``grad_accum: 1`` train on exactly the same micro-batches per step, and because every rank
knows the whole step, the global target count used for normalisation needs no communication.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

from instructkit.config import DistributedConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class DistributedError(RuntimeError):
    """A distributed setting cannot work for this model or machine; the message says the fix."""


@dataclass
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    cfg: DistributedConfig


# The process group is process-global state in torch.distributed itself; this mirrors it with the
# settings the run was started with, so the loop and save_final need no extra arguments.
_ACTIVE: DistContext | None = None


def launched_by_torchrun() -> bool:
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"))


def active() -> DistContext | None:
    return _ACTIVE


def rank() -> int:
    return _ACTIVE.rank if _ACTIVE else 0


def world_size() -> int:
    return _ACTIVE.world_size if _ACTIVE else 1


def is_main_process() -> bool:
    return rank() == 0


# ---------------------------------------------------------------------------------------------- launch


def relaunch(cli_args: Sequence[str], nproc: int) -> int:
    """Run ``python -m torch.distributed.run --standalone --nproc_per_node N -m instructkit ARGS``.

    Returns torchrun's exit code. Ctrl-C reaches torchrun and its workers through the terminal's
    process group; this process keeps waiting so the workers can checkpoint before it exits.
    """
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "instructkit", *map(str, cli_args)]
    print(f"launching {nproc} processes: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    proc = subprocess.Popen(cmd)
    while True:
        try:
            code = proc.wait()
            break
        except KeyboardInterrupt:
            continue
    if code not in (0, 130):
        print(f"error: the distributed run failed (torchrun exit code {code}); the failing rank and "
              f"its error are under 'Root Cause' above", file=sys.stderr)
    return code


def init(cfg: DistributedConfig) -> DistContext | None:
    """Join the process group when launched by torchrun (or for single-process FSDP2); else None.

    Backend ``auto`` is nccl when CUDA is available and gloo otherwise. Ranks other than 0 print
    nothing unless ``log_all_ranks`` is set; their errors still reach torchrun (see
    :func:`report_error`).
    """
    global _ACTIVE
    import torch.distributed as dist

    if not launched_by_torchrun():
        if cfg.strategy != "fsdp2":
            return None
        # FSDP2 on one device still buys CPU offload and mixed precision: a one-rank group in memory.
        store = dist.HashStore()
        rank_, world, local = 0, 1, 0
    else:
        store = None
        rank_, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise DistributedError("distributed.backend is nccl but this machine has no CUDA GPU; "
                                   "use backend: gloo (or auto)")
        if local >= torch.cuda.device_count():
            raise DistributedError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} GPUs are "
                                   f"visible; launch at most that many processes per node")
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    kwargs: dict[str, Any] = dict(backend=backend, timeout=timedelta(minutes=cfg.timeout_minutes))
    if store is not None:
        kwargs.update(store=store, rank=0, world_size=1)
    dist.init_process_group(**kwargs)
    _ACTIVE = DistContext(rank_, world, local, device, cfg)
    if rank_ != 0 and not cfg.log_all_ranks:
        devnull = open(os.devnull, "w")
        sys.stdout = sys.stderr = devnull
    return _ACTIVE


def shutdown() -> None:
    global _ACTIVE
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _ACTIVE = None


def report_error(e: BaseException) -> None:
    """Print ``error: ...`` (on ranks > 0 prefixed with the rank, on the real stderr)."""
    if _ACTIVE is None or _ACTIVE.world_size == 1:
        print(f"error: {e}", file=sys.stderr)
    else:
        print(f"[rank {_ACTIVE.rank}] error: {e}", file=sys.__stderr__, flush=True)


def record_errors(fn):
    """torchrun's error recording: an exception on any rank becomes the run's reported root cause."""
    from torch.distributed.elastic.multiprocessing.errors import record

    return record(fn)


# ---------------------------------------------------------------------------------------------- collectives


def barrier() -> None:
    import torch.distributed as dist

    if _ACTIVE is not None and _ACTIVE.world_size > 1:
        dist.barrier()


def all_reduce_sum(values: Sequence[float]) -> list[float]:
    """Element-wise sum over ranks, in float64 (exact enough to match a 1-process run's sums)."""
    import torch.distributed as dist

    if _ACTIVE is None or _ACTIVE.world_size == 1:
        return [float(v) for v in values]
    t = torch.tensor(list(values), dtype=torch.float64, device=_reduce_device())
    dist.all_reduce(t)
    return t.tolist()


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (one element when not distributed)."""
    import torch.distributed as dist

    if _ACTIVE is None or _ACTIVE.world_size == 1:
        return [obj]
    out: list[Any] = [None] * _ACTIVE.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    import torch.distributed as dist

    if _ACTIVE is None or _ACTIVE.world_size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _reduce_device() -> torch.device:
    import torch.distributed as dist

    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" \
        else torch.device("cpu")


# ---------------------------------------------------------------------------------------------- data


def shard_step(group: Sequence[dict], rank_: int, world: int) -> list[tuple[dict, bool]]:
    """This rank's micro-batches of one optimizer step, as ``(batch, counts)`` pairs.

    Rank ``r`` takes ``group[r::world]``. A short last step of an epoch can leave a rank fewer
    micro-batches than the others; it is padded with repeats marked ``counts=False`` (run with
    zero weight) because DDP and FSDP2 need every rank to run the same number of forward and
    backward passes.
    """
    mine = [(b, True) for b in group[rank_::world]]
    per_rank = -(-len(group) // world)
    return mine + [(group[0], False)] * (per_rank - len(mine))


# ---------------------------------------------------------------------------------------------- wrapping


class _LossModule(torch.nn.Module):
    """Runs ``fn(model, batch)`` (a method's loss function) as one module call.

    The loss functions call the decoder and output head directly (target-only logits), so the
    model's own ``forward`` never runs; DDP and FSDP2 both hook a module's forward, so they wrap
    this module instead.
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, fn, batch):
        return fn(self.model, batch)


def _loss_first(loss_fn):
    # The loss tensor at the top level of the output lets FSDP2 hook its backward.
    def fn(model, batch):
        out = loss_fn(model, batch)
        return out.loss_sum, out
    return fn


def _base(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _wrap_classes(model, wrap: str | list[str]) -> set[str]:
    present = {type(m).__name__ for m in model.modules()}
    if wrap == "auto":
        names = set(getattr(_base(model), "_no_split_modules", None) or [])
        if not names & present:
            raise DistributedError(
                f"distributed.wrap: auto found no decoder-layer class in {type(_base(model)).__name__} "
                f"(_no_split_modules={sorted(names)}); set distributed.wrap to the class name of its "
                f"transformer block, e.g. [LlamaDecoderLayer]")
        return names & present
    names = {wrap} if isinstance(wrap, str) else set(wrap)
    missing = names - present
    if missing:
        layerish = sorted(n for n in present if "Layer" in n or "Block" in n)
        raise DistributedError(f"distributed.wrap names {sorted(missing)}, which this model does not "
                               f"contain; its block classes are {layerish or sorted(present)[:12]}")
    return names


def _fully_shard(model: torch.nn.Module, ctx: DistContext) -> torch.nn.Module:
    try:
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
    except ImportError:
        raise DistributedError(f"distributed.strategy: fsdp2 needs torch>=2.6 (torch.distributed.fsdp."
                               f"fully_shard); this is torch {torch.__version__}. Upgrade or use ddp") from None
    import torch.distributed as dist

    c = ctx.cfg
    # fully_shard keeps each rank's slice of the weights it is given; make sure they start equal
    # (a randomly initialised head or LoRA matrix must not differ between ranks).
    if ctx.world_size > 1:
        with torch.no_grad():
            for t in list(model.parameters()) + list(model.buffers()):
                dist.broadcast(t.data, src=0)
    kwargs = dict(
        reshard_after_forward=c.reshard_after_forward,
        mp_policy=MixedPrecisionPolicy(param_dtype=DTYPES.get(c.param_dtype),
                                       reduce_dtype=DTYPES.get(c.reduce_dtype)),
        offload_policy=CPUOffloadPolicy(pin_memory=ctx.device.type == "cuda") if c.cpu_offload
        else OffloadPolicy())
    classes = _wrap_classes(model, c.wrap)
    for m in [m for m in model.modules() if type(m).__name__ in classes]:
        fully_shard(m, **kwargs)
    root = _LossModule(model)
    # Embeddings, final norm and output head (tied or not) form the root unit.
    fully_shard(root, **kwargs)
    # FSDP2 sets itself up on the root's first forward; run an empty one now, so code that calls
    # the bare model before the first training step (RL rollouts, evaluation) finds it ready.
    with torch.no_grad():
        root(lambda m, b: None, None)
    return root


class Engine:
    """How the loop runs forward and backward on this process: plain, DDP or FSDP2.

    ``grad_scale`` compensates the averaging over ranks that DDP's all-reduce and FSDP2's
    reduce-scatter apply: the loop already divides by the global target count, so the summed
    gradient is what a single process with the same global batch would get.
    """

    def __init__(self, model: torch.nn.Module, ctx: DistContext | None):
        self.model = model
        self.ctx = ctx
        self.rank = ctx.rank if ctx else 0
        self.world = ctx.world_size if ctx else 1
        self.strategy = ctx.cfg.strategy if ctx else None
        self.wrapped: torch.nn.Module | None = None
        if ctx is not None and self.strategy == "fsdp2":
            self.wrapped = _fully_shard(model, ctx)
        elif ctx is not None and self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.wrapped = DistributedDataParallel(
                _LossModule(model), device_ids=[ctx.local_rank] if ctx.device.type == "cuda" else None,
                find_unused_parameters=ctx.cfg.find_unused_parameters,
                broadcast_buffers=False)  # LM buffers (rotary tables) are constants
        else:
            self.strategy = None
        self.grad_scale = float(self.world) if self.wrapped is not None else 1.0
        if self.rank > 0:
            # Distinct dropout masks per rank (weights were initialised with the shared seed).
            torch.manual_seed(torch.initial_seed() + self.rank)

    def forward(self, loss_fn, batch: dict):
        if self.wrapped is None:
            return loss_fn(self.model, batch)
        return self.wrapped(_loss_first(loss_fn), batch)[1]

    def accumulating(self, sync: bool):
        """Context for one micro-batch's forward+backward: gradients are reduced only if ``sync``."""
        if self.strategy == "ddp" and not sync:
            return self.wrapped.no_sync()
        if self.strategy == "fsdp2":
            self.wrapped.set_requires_gradient_sync(sync)
        return nullcontext()

    @contextmanager
    def full_parameters(self) -> Iterator[None]:
        """Gather the root unit's parameters so code may call the bare model (evaluation)."""
        if self.strategy != "fsdp2":
            yield
            return
        self.wrapped.unshard()
        try:
            yield
        finally:
            self.wrapped.reshard()


# ---------------------------------------------------------------------------------------------- state


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a sharded DTensor (a collective: every rank must call it), else ``t``."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def local_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``full`` laid out like ``like``: this rank's shard if ``like`` is a DTensor (no communication)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(like, DTensor):
        return full.to(like.device)
    mesh = like.device_mesh
    d = distribute_tensor(full.to(mesh.device_type), mesh, like.placements, src_data_rank=None)
    return d.to(like.to_local().device)


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict | None:
    """``optimizer.state_dict()`` with every sharded state tensor gathered, on CPU, on rank 0.

    The result has exactly the layout of a single-process optimizer's state dict, so a checkpoint
    loads with any number of ranks and either strategy. Every rank must call it; ranks other than
    0 drop each gathered tensor at once and get None.
    """
    keep = is_main_process()
    sd = optimizer.state_dict()
    state = {}
    for i, st in sorted(sd["state"].items()):
        gathered = {k: (full_tensor(v) if torch.is_tensor(v) else v) for k, v in st.items()}
        if keep:
            state[i] = {k: (v.to("cpu", copy=True) if torch.is_tensor(v) else v) for k, v in gathered.items()}
    sd["state"] = state
    return sd if keep else None


def load_optimizer_state(optimizer: torch.optim.Optimizer, sd: dict) -> None:
    """Inverse of :func:`full_optimizer_state` for this rank's (possibly sharded) parameters."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for i, st in sd["state"].items():
        p = params[int(i)]
        for k, v in st.items():
            if torch.is_tensor(v) and v.shape == p.shape and v.ndim > 0:
                st[k] = local_like(v, p)
    optimizer.load_state_dict(sd)


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """The model's whole state dict on CPU when its parameters are sharded (FSDP2), else None.

    A collective: every rank must call it; only rank 0 keeps the tensors (the others get an empty
    dict). Tied parameters stay one tensor, so ``save_pretrained`` recognises them as tied.
    """
    from torch.distributed.tensor import DTensor

    sd = model.state_dict(keep_vars=True)
    if not any(isinstance(v, DTensor) for v in sd.values()):
        return None
    keep = is_main_process()
    done: dict[int, torch.Tensor] = {}
    out = {}
    for k, v in sd.items():
        if id(v) not in done:
            t = full_tensor(v.detach())
            done[id(v)] = t.to("cpu", copy=True) if keep else None
        if keep:
            out[k] = done[id(v)]
    return out
