"""One pytest session spread over torch.distributed ranks (``torchrun``, ``accelerate launch``):
the one module that talks to torch.distributed.

A launch is recognised by the variables torchrun sets (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``; multi-node torchrun with a rendezvous
endpoint sets the same ones, and ``accelerate launch --multi_gpu`` starts torchrun; without
``--multi_gpu`` accelerate starts one process, which is refused: :func:`accelerate_single_process`).
:func:`start` joins the process group (gloo on the CPU; on a GPU ``cpu:gloo,cuda:nccl``, so
CPU tensors still travel over gloo) and returns a
:class:`Group` whose collectives are what the plugin needs: this rank's share of a
generation's samples (:func:`share`), an all-gather of small arrays (per-sample values and
features; a set's pixels only when code reads them: ``generation.ShardedImageSet``), an
all-reduce in float64 of feature sums (Σf, Σfᵀf, n, as EDM2 does for FID), a gather to rank 0
alone (the per-image features only its decision needs) and a broadcast of rank 0's decision
(JSON, never pickle).

No rank waits forever for one that died or hangs: before each collective every rank marks
its arrival in the rendezvous store, and a rank that is not there within the timeout
(``--diffeval-dist-timeout``) is named, with the collective and the test, in a
:class:`~pytest_diffeval.exceptions.DistributedError`; the group is then broken and later
collectives fail at once instead of waiting again.

torch is imported inside functions only (loading the plugin stays light).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Mapping, Sequence

import numpy as np

from .exceptions import DistributedError

ENVIRONMENT = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
DEFAULT_TIMEOUT = 1800.0  # seconds; torch's own default for gloo collectives


@dataclass(frozen=True)
class Launch:
    """Where this process sits in a torchrun / accelerate launch."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    agent_store: bool = False  # torchrun's agent hosts the store (TORCHELASTIC_USE_AGENT_STORE)


def detect_launch(environ: Mapping[str, str] | None = None) -> Launch | None:
    """The launch this process belongs to, from torchrun's variables; None outside one or in a
    launch of a single process (nothing to spread).  A half-set or malformed environment is a
    :class:`DistributedError` naming the variable, and so is ``accelerate launch`` asked for
    several processes without ``--multi_gpu`` (see :func:`accelerate_single_process`)."""
    env = os.environ if environ is None else environ
    if "RANK" not in env or "WORLD_SIZE" not in env:
        refusal = accelerate_single_process(env)
        if refusal:
            raise DistributedError(refusal)
        return None
    numbers: dict[str, int] = {}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        raw = env.get(name, "0" if name == "LOCAL_RANK" else "")
        try:
            numbers[name] = int(raw)
        except ValueError:
            if name == "MASTER_PORT" and int(env.get("WORLD_SIZE", "1") or 1) <= 1:
                numbers[name] = 0
                continue
            raise DistributedError(
                f"pytest-diffeval: {name}={raw!r} is not a whole number (RANK={env.get('RANK')!r}, WORLD_SIZE="
                f"{env.get('WORLD_SIZE')!r}); fix: start the run with `torchrun --nproc_per_node=N -m pytest ...` or "
                "`accelerate launch -m pytest ...`, which set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and "
                "MASTER_PORT, or unset RANK and WORLD_SIZE for a single-process run") from None
    world, rank = numbers["WORLD_SIZE"], numbers["RANK"]
    if world <= 1:
        return None
    if not 0 <= rank < world:
        raise DistributedError(f"pytest-diffeval: RANK={rank} is outside 0..{world - 1} (WORLD_SIZE={world}); fix: "
                               "let torchrun or accelerate launch set RANK and WORLD_SIZE")
    if not env.get("MASTER_ADDR"):
        raise DistributedError(f"pytest-diffeval: RANK={rank} and WORLD_SIZE={world} are set but MASTER_ADDR is not; "
                               "fix: start the run with torchrun or accelerate launch, or set MASTER_ADDR and "
                               "MASTER_PORT to rank 0's host and a free port")
    return Launch(rank=rank, world_size=world, local_rank=numbers["LOCAL_RANK"], master_addr=str(env["MASTER_ADDR"]),
                  master_port=numbers["MASTER_PORT"],
                  agent_store=str(env.get("TORCHELASTIC_USE_AGENT_STORE", "")).lower() == "true")


def accelerate_single_process(env: Mapping[str, str]) -> str | None:
    """The message for ``accelerate launch --num_processes N`` (N > 1) that started one process,
    or None.  Without ``--multi_gpu`` (with ``--cpu``, or where it finds fewer than 2 GPUs)
    accelerate's "simple" launcher starts ONE process, sets MASTER_ADDR/MASTER_PORT but no
    RANK/WORLD_SIZE (its multi-CPU mode is mpirun, ``--mpirun_hostfile``, whose ranks this
    plugin does not join): each such process would run the whole suite and write alone.
    The simple launcher alone sets ACCELERATE_USE_CPU, and sets MASTER_ADDR only when asked
    for more than one process or machine (accelerate/utils/launch.py)."""
    if "ACCELERATE_USE_CPU" not in env or not env.get("MASTER_ADDR") or "RANK" in env:
        return None
    return ("pytest-diffeval: accelerate launch started this pytest as a single process (ACCELERATE_USE_CPU="
            f"{env['ACCELERATE_USE_CPU']!r}, MASTER_ADDR={env['MASTER_ADDR']!r}, no RANK/WORLD_SIZE): without "
            "--multi_gpu, accelerate runs one process whatever --num_processes says (--cpu, or fewer than 2 GPUs "
            "found), so the suite would not be spread; fix: `accelerate launch --multi_gpu --num_processes N -m pytest "
            "...` (it starts torchrun: NCCL on GPUs, gloo on a machine without GPUs or with --diffeval-device=cpu), or "
            "drop --num_processes for a single-process run")


def xdist_refusal(launch: Launch | None, numprocesses: Any) -> str | None:
    """The message refusing ``-n`` (pytest-xdist) inside a torchrun launch, or None when fine."""
    if launch is None or not numprocesses:
        return None
    return (f"pytest-diffeval: -n {numprocesses} (pytest-xdist) cannot be combined with a torchrun / accelerate launch "
            f"(this is rank {launch.rank} of WORLD_SIZE={launch.world_size}): both would spread the same tests over "
            "processes; fix: drop -n (torchrun's ranks already share each generation), or run without torchrun "
            "and keep -n")


def share(count: int, rank: int, world_size: int, batch: int = 1) -> range:
    """The sample indices rank ``rank`` makes of ``count``: a contiguous block of whole batches
    of ``batch`` samples (the batches one process makes, 0..batch-1, batch..2·batch-1, ...), the
    first ranks one batch longer, so the blocks in rank order are 0..count-1.  Whole batches
    keep each image's bits: a pipeline's output can change with the other samples in its batch
    (measured: one pixel level for the embedded model), so no block may cut a batch."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"pytest-diffeval: rank {rank} is outside a world of {world_size}")
    batch = max(1, int(batch))
    base, extra = divmod(-(-count // batch), world_size)
    start = rank * base + min(rank, extra)
    stop = start + base + (1 if rank < extra else 0)
    return range(min(start * batch, count), min(stop * batch, count))


def merge_shares(parts: Sequence[np.ndarray]) -> np.ndarray:
    """The ranks' blocks (rank order) as one array; empty blocks (more ranks than samples)
    take the others' sample shape.  Blocks whose sample shapes differ are an error."""
    shapes = {part.shape[1:] for part in parts if len(part)}
    if len(shapes) > 1:
        raise DistributedError(f"pytest-diffeval: ranks produced samples of different shapes {sorted(shapes)}; "
                               "fix: make every rank load the same model with the same arguments")
    if not shapes:
        return np.concatenate(parts) if parts else np.zeros((0,))
    shape = shapes.pop()
    return np.concatenate([part if len(part) else part.reshape((0, *shape)) for part in parts])


def statistics_of(features: np.ndarray) -> dict[str, np.ndarray]:
    """One rank's feature sums in float64: ``sum`` (Σf), ``outer`` (Σfᵀf) and ``n``; summed
    over ranks they give the whole set's mean and covariance (:func:`moments`)."""
    f = np.asarray(features, dtype=np.float64)
    f = f.reshape(len(f), int(np.prod(f.shape[1:])))  # not -1: an empty block (0, D) has no size to infer it from
    return {"sum": f.sum(axis=0), "outer": f.T @ f, "n": np.array([float(len(f))])}


def moments(sums: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance from summed :func:`statistics_of` - what FID needs."""
    n = float(sums["n"][0])
    mean = sums["sum"] / n
    covariance = (sums["outer"] - n * np.outer(mean, mean)) / (n - 1)
    return mean, covariance


def _current_test() -> str:
    current = os.environ.get("PYTEST_CURRENT_TEST", "")
    return current.rsplit(" (", 1)[0] or "no test (session set-up or tear-down)"


@dataclass
class Group:
    """This process's place in the started process group, and its collectives (each checked
    for every rank's arrival first; see the module docstring)."""

    launch: Launch
    timeout: float
    backend: str
    store: Any = None  # torch.distributed.Store (PrefixStore "diffeval/")
    seq: int = 0
    broken: str | None = None
    poll: float = field(default=0.002, repr=False)
    restore: Any = field(default=None, repr=False)  # undoes _torchmetrics_unsynced()
    # Bytes this rank received from all-gathers, by kind ("pixels": a set's images; "rows":
    # per-sample values and features): what shows that a run gathered no whole set of pixels.
    gathered: dict[str, int] = field(default_factory=dict, repr=False)

    @property
    def rank(self) -> int:
        return self.launch.rank

    @property
    def world_size(self) -> int:
        return self.launch.world_size

    def share(self, count: int, batch: int = 1) -> range:
        return share(count, self.rank, self.world_size, batch)

    # ------------------------------------------------------------------ arrival and errors

    def _arrive(self, what: str) -> None:
        """Mark this rank's arrival at collective ``seq`` and wait (up to the timeout) for the
        others'; a missing rank is a DistributedError naming it."""
        if self.broken:
            raise DistributedError(f"pytest-diffeval: rank {self.rank} cannot {what} in {_current_test()}: the "
                                   f"process group broke earlier ({self.broken.splitlines()[0]})")
        self.seq += 1
        keys = [f"{self.seq}/{r}" for r in range(self.world_size)]
        self.store.set(keys[self.rank], what)
        if self.seq > 2:
            try:
                self.store.delete_key(f"{self.seq - 2}/{self.rank}")  # everyone is past it
            except Exception:  # noqa: BLE001 - housekeeping only
                pass
        deadline, pause = time.monotonic() + self.timeout, self.poll
        while not self.store.check(keys):
            if time.monotonic() > deadline:
                missing = [r for r, key in enumerate(keys) if not self.store.check([key])]
                self._fail(f"rank {', '.join(map(str, missing))} did not reach collective #{self.seq} ({what}) "
                           f"within {self.timeout:g} s")
            time.sleep(pause)
            pause = min(pause * 2, 0.05)
        reached = [value.decode(errors="replace") for value in self.store.multi_get(keys)]
        if len(set(reached)) > 1:  # e.g. rank-0-only code reading a ShardedImageSet's images: gloo would hang
            self._fail("the ranks reached different collectives (" + "; ".join(
                f"rank {r}: {w}" for r, w in enumerate(reached)) + "): code that runs on some ranks only called "
                "a collective")

    def _fail(self, why: str, cause: BaseException | None = None) -> None:
        test = _current_test()
        message = (f"pytest-diffeval: {why}, in test {test} (this is rank {self.rank} of {self.world_size}); a rank "
                   "that died or hangs stops the whole session; fix: read that rank's output for its error (with "
                   "torchrun: the lines prefixed with its rank, or --tee 3 / --log-dir), or raise "
                   "--diffeval-dist-timeout if a rank is only slow")
        self.broken = message
        raise DistributedError(message) from cause

    def _collective(self, what: str, function: Any, *args: Any) -> Any:
        self._arrive(what)
        try:
            return function(*args)
        except RuntimeError as exc:  # gloo/NCCL: a peer closed its connection or timed out mid-collective
            self._fail(f"{what} failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}", exc)

    # ------------------------------------------------------------------ collectives

    def all_gather_array(self, array: np.ndarray, what: str = "all-gather", kind: str = "other") -> list[np.ndarray]:
        """Every rank's ``array`` (rank order).  Lengths (first axis) may differ; dtypes and the
        other axes must not (empty arrays take the others' shape and dtype).  The bytes received
        are counted under ``kind`` in :attr:`gathered`."""
        import torch

        local = np.ascontiguousarray(array)
        header = np.zeros(10, dtype=np.int64)
        header[0] = local.ndim
        header[1:1 + local.ndim] = local.shape
        header[9] = ord(local.dtype.char)
        headers = self._gather_fixed(torch.from_numpy(header), f"{what}: shapes")
        shapes = [tuple(int(v) for v in h[1:1 + int(h[0])]) for h in headers]
        filled = next((h for h, s in zip(headers, shapes) if s and s[0]), None)
        if not len(local) and filled is not None:  # an empty block (more ranks than samples) cannot know the dtype
            local = local.astype(np.dtype(chr(int(filled[9]))))
        dtype = np.uint8 if local.dtype == np.bool_ else local.dtype
        longest = max(s[0] if s else 0 for s in shapes)
        tail = next((s[1:] for s in shapes if s and s[0]), local.shape[1:])
        padded = np.zeros((longest, *tail), dtype=dtype)
        if len(local):
            padded[: len(local)] = local
        parts = self._gather_fixed(torch.from_numpy(padded), what)
        self.gathered[kind] = self.gathered.get(kind, 0) + sum(part.nbytes for part in parts)
        return [part[: (s[0] if s else 0)].astype(local.dtype, copy=False) for part, s in zip(parts, shapes)]

    def gather_to_root(self, array: np.ndarray, what: str = "gather to rank 0", kind: str = "other") -> np.ndarray | None:
        """Every rank's block ``array`` (see :func:`share`) as one array on rank 0, None on the
        others: for data only rank 0's decision needs (per-image features of a set-level check).
        Lengths may differ; the bytes rank 0 receives are counted under ``kind``."""
        import torch
        import torch.distributed as dist

        local = np.ascontiguousarray(array)
        lengths = [int(n[0]) for n in self._gather_fixed(torch.tensor([len(local)], dtype=torch.int64),
                                                      f"{what}: lengths")]
        padded = np.zeros((max(lengths), *local.shape[1:]), dtype=local.dtype)
        padded[: len(local)] = local
        tensor = torch.from_numpy(padded)
        received = [torch.empty_like(tensor) for _ in range(self.world_size)] if self.rank == 0 else None
        self._collective(what, dist.gather, tensor, received, 0)
        if received is None:
            return None
        parts = [t.numpy()[:n] for t, n in zip(received, lengths)]
        self.gathered[kind] = self.gathered.get(kind, 0) + sum(part.nbytes for part in parts)
        return merge_shares(parts)

    def _gather_fixed(self, tensor: Any, what: str) -> list[np.ndarray]:
        import torch
        import torch.distributed as dist

        received = [torch.empty_like(tensor) for _ in range(self.world_size)]
        self._collective(what, dist.all_gather, received, tensor)
        return [t.numpy() for t in received]

    def gather_samples(self, local: np.ndarray, what: str = "gather samples", kind: str = "other") -> np.ndarray:
        """The whole set from every rank's block of it (see :func:`share`)."""
        return merge_shares(self.all_gather_array(local, what, kind))

    def all_reduce_sums(self, sums: Mapping[str, np.ndarray], what: str = "all-reduce feature sums") -> dict[str, np.ndarray]:
        """``sums`` (e.g. :func:`statistics_of`) summed over the ranks, in float64."""
        import torch
        import torch.distributed as dist

        out: dict[str, np.ndarray] = {}
        for key in sorted(sums):
            tensor = torch.from_numpy(np.array(sums[key], dtype=np.float64, copy=True))
            self._collective(f"{what} ({key})", dist.all_reduce, tensor)
            out[key] = tensor.numpy()
        return out

    def broadcast_json(self, value: Any, what: str = "broadcast rank 0's decision") -> Any:
        """Rank 0's ``value`` (JSON-serialisable) on every rank."""
        import torch
        import torch.distributed as dist

        data = json.dumps(value).encode() if self.rank == 0 else b""
        length = torch.tensor([len(data)], dtype=torch.int64)
        self._collective(f"{what}: length", dist.broadcast, length, 0)
        buffer = (torch.frombuffer(bytearray(data), dtype=torch.uint8) if self.rank == 0
                  else torch.empty(int(length[0]), dtype=torch.uint8))
        if int(length[0]):
            self._collective(what, dist.broadcast, buffer, 0)
        return json.loads(bytes(buffer.numpy()).decode()) if int(length[0]) else None

    def all_gather_json(self, value: Any, what: str = "all-gather") -> list[Any]:
        """Every rank's ``value`` (JSON-serialisable), rank order."""
        data = np.frombuffer(json.dumps(value).encode(), dtype=np.uint8)
        return [json.loads(bytes(part).decode()) for part in self.all_gather_array(data, what)]

    def close(self) -> None:
        """Leave the process group once every rank is here: a gloo rank whose peer tears its
        connections down mid-exchange aborts (SIGABRT, "terminate called without an active
        exception"; seen once in 3 ranks under load), so the ranks meet first."""
        import torch
        import torch.distributed as dist

        if not dist.is_initialized() or self.broken:
            return
        try:
            self._collective("leave the process group", dist.all_reduce, torch.zeros(1))  # CPU: over gloo
        except DistributedError:
            return  # a rank is gone: nothing to tear down together
        dist.destroy_process_group()


_ACTIVE: list[Group] = []


def start(launch: Launch, *, device: str = "cpu", timeout: float = DEFAULT_TIMEOUT) -> Group:
    """Join the launch's process group (once per process: an already initialised default
    group is reused) and make it the active one (:func:`current`)."""
    import torch.distributed as dist

    if not dist.is_available():
        raise DistributedError("pytest-diffeval: this torch build has no torch.distributed; fix: install a torch "
                               "build with distributed support, or run without torchrun")
    limit = timedelta(seconds=timeout)
    backend = "cpu:gloo,cuda:nccl" if str(device).startswith("cuda") else "gloo"
    try:
        store = dist.TCPStore(launch.master_addr, launch.master_port, launch.world_size,
                              launch.rank == 0 and not launch.agent_store, limit, multi_tenant=True)
        if not dist.is_initialized():
            dist.init_process_group(backend, store=dist.PrefixStore("pg", store), rank=launch.rank,
                                    world_size=launch.world_size, timeout=limit)
    except (RuntimeError, ValueError) as exc:
        raise DistributedError(
            f"pytest-diffeval: rank {launch.rank} of {launch.world_size} could not join the process group at "
            f"{launch.master_addr}:{launch.master_port} ({backend}): {type(exc).__name__}: {exc}; fix: check that "
            "every rank was started (torchrun --nproc_per_node / --nnodes), that MASTER_ADDR/MASTER_PORT or the "
            "rendezvous endpoint are reachable, or raise --diffeval-dist-timeout") from exc
    group = Group(launch=launch, timeout=timeout, backend=backend, store=dist.PrefixStore("diffeval", store))
    group.restore = _torchmetrics_unsynced()
    _ACTIVE.append(group)
    return group


def stop(group: Group) -> None:
    """Leave the process group (at the session's end)."""
    if group in _ACTIVE:
        _ACTIVE.remove(group)
    if group.restore is not None:
        group.restore()
        group.restore = None
    group.close()


def _torchmetrics_unsynced() -> Any:
    """Keep torchmetrics from syncing its metrics' states over the process group.

    Once a default process group exists, every torchmetrics ``Metric`` all-gathers its states
    across the ranks in ``compute()``.  Here the plugin fills each rank's states with the whole
    set's already (FID/drift: all-reduced sums; KID/CMMD: all-gathered features), so that would
    count each sample once per rank (FID's covariance and KID's subsets changed) and would make a
    rank that skips a metric hang the others (torchmetrics #2684).  Metrics built while the
    group is active are told no group exists (``Metric.__init__`` reads
    ``torchmetrics.metric.jit_distributed_available``); returns what puts it back."""
    try:
        import torchmetrics.metric as tm_metric
    except ImportError:
        return None
    original = tm_metric.jit_distributed_available

    def restore() -> None:
        tm_metric.jit_distributed_available = original

    tm_metric.jit_distributed_available = _no_group
    return restore


def _no_group() -> bool:
    return False


def current() -> Group | None:
    """The active group, or None outside a launch."""
    return _ACTIVE[-1] if _ACTIVE else None


def is_writer() -> bool:
    """Whether this process writes the session's files (baselines, results, report, JUnit,
    step summary): outside a launch always, in one rank 0 only."""
    group = current()
    return group is None or group.rank == 0


def everyone(flag: bool, what: str = "agree on a shortcut") -> bool:
    """``flag`` on every rank (outside a launch: ``flag``).  For a per-rank shortcut that
    skips collectives (every sample cached here): taken only when all ranks can take it, so
    no rank waits at a collective the others skipped."""
    group = current()
    if group is None:
        return flag
    return all(group.all_gather_json(bool(flag), what))
