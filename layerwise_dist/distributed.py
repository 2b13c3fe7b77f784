"""Process-group helpers shared by every launcher: rank-aware logging, init, reductions."""

from __future__ import annotations

import logging
import os
import sys

import torch
import torch.distributed as dist


def rank() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


class _RankFilter(logging.Filter):
    def __init__(self, all_ranks: bool) -> None:
        super().__init__()
        self.all_ranks = all_ranks

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = rank()
        return self.all_ranks or record.rank == 0 or record.levelno >= logging.WARNING


def get_logger(name: str = "layerwise_dist", all_ranks: bool | None = None) -> logging.Logger:
    """One logger; rank 0 writes unless LD_LOG_ALL_RANKS=1 (warnings from every rank)."""
    logger = logging.getLogger(name)
    if not getattr(logger, "_ld_configured", False):
        if all_ranks is None:
            all_ranks = os.environ.get("LD_LOG_ALL_RANKS", "0") == "1"
        handler = logging.StreamHandler(sys.stderr)  # stdout stays for results (tables, JSON)
        handler.setFormatter(logging.Formatter("[RANK %(rank)s] %(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        handler.addFilter(_RankFilter(all_ranks))
        logger.addHandler(handler)
        logger.setLevel(os.environ.get("LD_LOG_LEVEL", "INFO"))
        logger.propagate = False
        logger._ld_configured = True  # type: ignore[attr-defined]
    return logger


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank())
    return torch.device("cpu")


def backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


#: Set (to "1") by ``layerwise-dist`` without ``--verbose``: the ranks hide third-party logs and loading bars.
QUIET_ENV = "LD_QUIET"

#: glibc settings for CPU ranks, set by the launchers that start them (``layerwise-dist --nproc N``, Ray's CPU
#: workers) unless the environment sets them. glibc serves every allocation over 32 MB with a fresh mmap and
#: unmaps it at free, so each step's full-vocabulary logits (~190 MB a tensor for two pointwise examples of
#: SmolLM2) are page-faulted and zeroed by the kernel again and again: 30-45% of a rank's CPU time went to the
#: kernel in the experiment. With mmap off, freed memory stays in the heap and is reused (measured on the
#: experiment's first cell, same sitting: 7.0 -> 4.9 s per distillation step, kernel time 3.0 -> 1.4 s per
#: 10 s of a rank). glibc reads them at process start; ranks started without them get them at
#: :func:`init_distributed` (:func:`heap_only_allocation`).
CPU_ALLOCATOR_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(64 << 30)}

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's mallopt() options (malloc.h)


def heap_only_allocation() -> dict[str, int]:
    """The settings of :data:`CPU_ALLOCATOR_ENV` applied to this running process with glibc's ``mallopt()``,
    for CPU ranks started without them in their environment (a bare ``deepspeed launchers/...``, a Ray or
    SLURM set-up of one's own, ``--nproc 1`` in process): :func:`init_distributed` calls it. A setting the
    environment names is left as glibc read it at start. ``mallopt`` takes an ``int``, so the trim threshold
    is 2 GiB here, not 64. Returns what it set (empty: nothing to do, a CUDA run, or no glibc).
    """
    import ctypes

    if torch.cuda.is_available():
        return {}
    wanted = {
        "MALLOC_MMAP_MAX_": (_M_MMAP_MAX, 0),
        "MALLOC_TRIM_THRESHOLD_": (_M_TRIM_THRESHOLD, min(int(CPU_ALLOCATOR_ENV["MALLOC_TRIM_THRESHOLD_"]), 2**31 - 1)),
    }
    wanted = {k: v for k, v in wanted.items() if k not in os.environ}
    if not wanted:
        return {}
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 (glibc, not musl: the options below are glibc's)
    except (OSError, AttributeError):
        return {}
    done = {}
    for key, (option, value) in wanted.items():
        if libc.mallopt(ctypes.c_int(option), ctypes.c_int(value)) == 1:
            done[key] = value
    return done


def quiet() -> bool:
    return os.environ.get(QUIET_ENV) == "1"


def quiet_third_party() -> None:
    """Without ``--verbose``: transformers' loading/saving bars and info lines, and DeepSpeed's info and
    warning lines, are hidden (errors still show); the package's own log and one bar per stage remain."""
    if not quiet():
        return
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        from deepspeed.utils import logger as ds_logger

        ds_logger.setLevel(logging.ERROR)
    except ImportError:  # pragma: no cover - deepspeed is a dependency
        pass


def init_distributed() -> None:
    """Join the process group the launcher set up (deepspeed, torchrun, Ray); a group of one alone.

    DeepSpeed picks gloo on its CPU accelerator and NCCL on CUDA by itself; we go
    through it so ZeRO-3 and our own collectives share one group. When a launcher
    (Ray Train, a user's ``init_process_group``) already made the group, DeepSpeed
    must still wrap it, or its config would see a world of one.
    """
    if not dist.is_initialized() and "WORLD_SIZE" not in os.environ and "RANK" not in os.environ:
        # A single process without a launcher: DeepSpeed still wants a group of one.
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
    heap_only_allocation()
    prepare_shm_op()
    import contextlib
    import io

    import deepspeed

    # DeepSpeed prints "... shm_comm_op built successfully" on stdout from every rank at each init.
    with contextlib.redirect_stdout(io.StringIO()) if quiet() else contextlib.nullcontext():
        deepspeed.init_distributed(dist_backend=backend())
    release_shm_names()
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())


_SHM_OP_READY = False


def extensions_dir() -> str:
    """Where torch JIT-builds C++ ops (DeepSpeed's CPU shm comm op) for this environment.

    ``TORCH_EXTENSIONS_DIR`` when set; else, inside a virtual environment, ``<venv>/torch_extensions``
    (set in the environment, so ranks and subprocesses agree). torch's own default,
    ``~/.cache/torch_extensions/py311_cpu``, is shared by every environment of a user: an op built
    against one torch is loaded by another, and one killed build blocks them all (below).
    """
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root:
        return root
    if sys.prefix != getattr(sys, "base_prefix", sys.prefix):
        root = os.path.join(sys.prefix, "torch_extensions")
        os.environ["TORCH_EXTENSIONS_DIR"] = root
        return root
    from torch.utils.cpp_extension import _get_build_directory

    return os.path.dirname(_get_build_directory("deepspeed_shm_comm", verbose=False))


def prepare_shm_op(verbose: bool = False) -> None:
    """Load (building once) DeepSpeed's CPU shm comm op, safe against builds killed half-way.

    Every load of a torch JIT op, built or not, takes the baton file ``<build dir>/lock`` (``O_EXCL``)
    and removes it after; a process killed inside that window (a SIGKILLed rank, a session's end)
    leaves the file, and every later load waits on it forever: this hung a CI run for its whole
    90 minutes. Here each load holds an ``flock`` on ``<extensions dir>/.layerwise_dist.flock``,
    which the kernel releases however its holder dies, so a baton found while holding it was left
    by a dead process and is removed. DeepSpeed caches the loaded op per process;
    ``deepspeed.init_distributed`` then reuses it. No-op on CUDA (NCCL, no shm op).
    """
    global _SHM_OP_READY
    if _SHM_OP_READY or torch.cuda.is_available():
        return
    import fcntl

    root = extensions_dir()
    os.makedirs(root, exist_ok=True)
    baton = os.path.join(root, "deepspeed_shm_comm", "lock")
    with open(os.path.join(root, ".layerwise_dist.flock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            if os.path.exists(baton):
                get_logger().warning("removing %s: a build lock left by a process killed while loading the op", baton)
                os.unlink(baton)
            from deepspeed.comm.torch import build_shm_op

            if verbose:
                build_shm_op()
            else:
                import contextlib
                import io

                with contextlib.redirect_stdout(io.StringIO()):
                    build_shm_op()
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
    _SHM_OP_READY = True


def release_shm_names() -> None:
    """Unlink the names of DeepSpeed's CPU all-reduce buffers once every rank has mapped them.

    DeepSpeed's CPU shm comm op creates ``/dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>``
    (66 MB each) and never unlinks it, so every multi-rank CPU run, finished or killed, leaves them
    behind until the machine runs out of memory. Every rank has opened every peer's buffer when
    ``init_distributed`` returns; after a barrier the names can go: the mappings stay valid and the
    kernel frees the memory when the last rank exits, however it exits.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    port = os.environ.get("MASTER_PORT", "")
    if not port or not os.path.isdir("/dev/shm"):
        return
    dist.barrier()
    import glob

    for path in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_{dist.get_rank()}"):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def destroy_engine(engine: object) -> None:
    """Destroy a DeepSpeed engine so that its model can be freed.

    ``engine.destroy()`` alone is not enough under ZeRO-3 (DeepSpeed 0.19): ``DeepSpeedZeRoOffload``
    appends the engine's top module to the module-level ``FWD_MODULE_STACK`` when it is built and
    nothing removes it, so every engine's model (parameters, gradients, optimizer states reachable from
    it) lives until the process ends. An ablation builds one student engine per cell: RSS grew by one
    student per cell until a run was OOM-killed. And ``PartitionedParameterCoordinator.__params_to_release``
    is a ``functools.lru_cache`` on the class, keyed by (coordinator, submodule, step): it keeps every
    coordinator and submodule it has seen (so every engine's model) alive. Here the stack loses every
    entry that belongs to the engine's module, that cache is cleared (it refills for the live engines
    on their next step), then the engine is destroyed.
    """
    module = getattr(engine, "module", None)
    if module is not None:
        try:
            from deepspeed.runtime.zero import parameter_offload
        except ImportError:  # pragma: no cover - deepspeed is a dependency
            parameter_offload = None
        stack = getattr(parameter_offload, "FWD_MODULE_STACK", None)
        if isinstance(stack, list) and stack:
            owned = {id(m) for m in module.modules()}
            stack[:] = [m for m in stack if id(m) not in owned]
    if hasattr(engine, "destroy"):
        engine.destroy()
    _clear_zero3_release_cache()


def _clear_zero3_release_cache() -> None:
    try:
        from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator
    except ImportError:  # pragma: no cover - deepspeed is a dependency
        return
    # The cached function sits under DeepSpeed's nvtx wrapper (a closure, no __wrapped__): search both.
    todo = [getattr(PartitionedParameterCoordinator, "_PartitionedParameterCoordinator__params_to_release", None)]
    while todo:
        fn = todo.pop()
        if fn is None:
            continue
        if hasattr(fn, "cache_clear"):
            fn.cache_clear()
            return
        todo.append(getattr(fn, "__wrapped__", None))
        todo.extend(c.cell_contents for c in (getattr(fn, "__closure__", None) or ()) if callable(c.cell_contents))
    get_logger().warning("DeepSpeed's ZeRO-3 release cache was not found: destroyed engines' models may stay in memory")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for a rendezvous)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks in place (fp64 on CPU keeps sums exact enough across ranks)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dev = device() if backend() == "nccl" else torch.device("cpu")
        moved = tensor.to(dev)
        dist.all_reduce(moved, op=dist.ReduceOp.SUM)
        tensor.copy_(moved.to(tensor.device))
    return tensor


def barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
