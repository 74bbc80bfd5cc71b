"""One POSIX shared-memory segment shared by the ranks of a host, and its epoch-flag barrier.

Life of a segment: rank 0 creates it (mode 0600, private to the user) and fills its pages,
the name goes to the other ranks over the gloo `cpu_group`, they attach, and as soon as every
rank holds a mapping rank 0 unlinks the name. From then on nothing is left in /dev/shm even
if a rank is SIGKILLed: the memory lives exactly as long as the last mapping. `close()` unmaps.

Python's `multiprocessing.shared_memory` is not used: on 3.11 its resource tracker registers
the segment in every attaching process and unlinks or warns about it at exit. `_posixshmem`
(the same two system calls, no tracker) plus `mmap` gives us the life cycle above.

Flags: each rank owns one int64 flag on its own 128-byte line (no false sharing, and apart
from the adjacent-line prefetcher's pair). A rank only ever writes its own flag, always with a
larger epoch, so a flag never needs resetting; a barrier at epoch e is "set mine to e, wait
until every flag is >= e".

Waiting, in three phases: a rank that has a core to itself spins briefly on the flags; then
it checks them between `sched_yield()` calls for up to `yield_s` (the core goes to whatever
else is runnable there, a peer of an oversubscribed host first of all, and comes straight
back when nothing is: Open MPI's yield-when-idle); then it sleeps in the kernel with
FUTEX_WAIT (Linux; a futex in a shared mapping works across processes), so its core goes idle.
Spinning alone (DeepSpeed's op) costs milliseconds per call as soon as ranks outnumber free
cores; sleeping at once costs a wake-up (tens of microseconds) per call; yielding costs a
system call per check and keeps a peer on the same core a few microseconds away.
All sleepers of a barrier sleep on one `generation` word, on a line of its own: the rank that
sees every flag at the epoch (normally the last to arrive) writes the epoch there and wakes them
all with one FUTEX_WAKE, so a barrier costs one wake-up per sleeper, not a chain of them. The
generation only grows: a later epoch is written only after its writer saw every flag at that
epoch, and each rank's earlier generation store precedes its flag store.
Before sleeping a rank sets the `sleeping` word of its line; the waker makes the system call
only when some peer sleeps, so the fast path makes none. x86 lets that check pass the
generation store (the store-load pair of Dekker's algorithm), so a wake-up can be missed:
each sleep is therefore capped at `nap_s` (1 ms), after which the waiter looks again.
Without futexes it naps with time.sleep.

Memory ordering: the data a rank writes (a memmove or a torch op that has returned) precedes
its flag store in program order. x86-64 is TSO: stores become visible to other cores in program
order, and loads are not reordered with older loads, so a peer that sees the new flag also sees
the data, and a peer's reads of the data cannot pass its read of the flag. On weaker ISAs
(aarch64, POWER) a release fence before the flag store and an acquire fence after the flag load
would be needed; Python exposes neither, so `supported_isa()` limits the backends to x86-64.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import platform
import sys
import time
import uuid

import torch
import torch.distributed as dist

__all__ = [
    "Segment",
    "FlagBarrier",
    "supported_isa",
    "shm_dir_reason",
    "NAME_PREFIX",
    "FLAG_STRIDE_BYTES",
    "timeout_message",
]

NAME_PREFIX = "aat-"  # every segment of this project is /dev/shm/aat-<run_tag>-...
FLAG_STRIDE_BYTES = 128
PAGE_BYTES = 4096
SHM_DIR = "/dev/shm"


def supported_isa() -> bool:
    """True on x86-64, whose store order makes flag-after-data publication safe."""
    return platform.machine().lower() in ("x86_64", "amd64")


def shm_dir_reason(nbytes: int = 0) -> str | None:
    """None if /dev/shm can hold `nbytes` more, else why not."""
    try:
        import _posixshmem  # noqa: F401
    except ImportError:
        return "this Python has no POSIX shared memory (_posixshmem)"
    if not os.path.isdir(SHM_DIR):
        return f"{SHM_DIR} does not exist"
    if not os.access(SHM_DIR, os.W_OK | os.X_OK):
        return f"{SHM_DIR} is not writable"
    return shm_room_reason(nbytes) if nbytes else None


def shm_room_reason(nbytes: int) -> str | None:
    """Why /dev/shm cannot take a segment of `nbytes` more, or None (also where its free
    space cannot be read)."""
    free_bytes = shm_free_bytes()
    if free_bytes is None or free_bytes >= nbytes:
        return None
    return (
        f"{SHM_DIR} has {free_bytes >> 20} MiB free, the segment needs "
        f"{(nbytes + (1 << 20) - 1) >> 20} MiB (not enough shared memory)"
    )


def shm_free_bytes() -> int | None:
    """Bytes /dev/shm can still take (a container's default is 64 MiB), or None."""
    try:
        free = os.statvfs(SHM_DIR)
    except OSError:
        return None
    return free.f_bavail * free.f_frsize


def segment_bytes(world_size: int, data_bytes: int) -> int:
    """The size of a segment of `data_bytes` for `world_size` ranks: flags, then data."""
    return round_up((world_size + 1) * FLAG_STRIDE_BYTES) + round_up(max(data_bytes, 1))


def round_up(nbytes: int, multiple: int = PAGE_BYTES) -> int:
    return (nbytes + multiple - 1) // multiple * multiple


def _broadcast(obj, group) -> object:
    holder = [obj]
    dist.broadcast_object_list(holder, src=dist.get_global_rank(group, 0), group=group)
    return holder[0]


def _gather(obj, group) -> list:
    out: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


class Segment:
    """A mapping of one segment: `flags` (ctypes int64 array), `data` (uint8 tensor)."""

    def __init__(self, mm: mmap.mmap, world_size: int, data_offset: int, name: str) -> None:
        self.name = name
        self._mm: mmap.mmap | None = mm
        words = (world_size + 1) * FLAG_STRIDE_BYTES // 8  # a line per rank + generation
        self.flags = (ctypes.c_int64 * words).from_buffer(mm, 0)
        self.data = torch.frombuffer(mm, dtype=torch.uint8, offset=data_offset)
        self.data_ptr = self.data.data_ptr()

    @classmethod
    def open(cls, group, rank: int, world_size: int, data_bytes: int, label: str) -> Segment:
        """Collective over `group`: rank 0 creates, all attach, the name is unlinked at once."""
        import _posixshmem

        data_offset = round_up((world_size + 1) * FLAG_STRIDE_BYTES)
        total = segment_bytes(world_size, data_bytes)
        name, error = None, None
        if rank == 0:
            name = f"/{NAME_PREFIX}{label}-{uuid.uuid4().hex[:8]}"
            error = shm_dir_reason(total)
            if error is None:
                error = _create(name, total)
        name, error = _broadcast((name, error), group)
        if error:
            raise OSError(error)
        mm, error = None, None
        try:
            mm = _attach(name, total)
        except OSError as exc:
            error = f"rank {rank} could not attach {name}: {exc}"
        errors = [e for e in _gather(error, group) if e]
        if rank == 0:
            # every rank holds a mapping (or gave up): the name is no longer needed
            try:
                _posixshmem.shm_unlink(name)
            except FileNotFoundError:
                pass
        if errors:
            if mm is not None:
                mm.close()
            raise OSError(errors[0])
        return cls(mm, world_size, data_offset, name)

    def close(self) -> None:
        """Drop our views and unmap. Idempotent; a view still held elsewhere keeps the mapping
        alive until it is collected (never a dangling pointer)."""
        if self._mm is None:
            return
        mm, self._mm = self._mm, None
        self.flags = None  # type: ignore[assignment]
        self.data = None  # type: ignore[assignment]
        self.data_ptr = 0
        try:
            mm.close()
        except BufferError:
            pass


def _create(name: str, total: int) -> str | None:
    """Create, size and fill the segment; None or the reason it failed."""
    import _posixshmem

    try:
        fd = _posixshmem.shm_open(name, os.O_CREAT | os.O_EXCL | os.O_RDWR, mode=0o600)
    except OSError as exc:
        return f"could not create {name}: {exc}"
    try:
        os.ftruncate(fd, total)
        # allocate every page now: a full /dev/shm is an error here, not a SIGBUS mid-copy
        os.posix_fallocate(fd, 0, total)
    except OSError as exc:
        _posixshmem.shm_unlink(name)
        return f"could not allocate {total >> 20} MiB in {SHM_DIR} for {name}: {exc}"
    finally:
        os.close(fd)
    return None


def _attach(name: str, total: int) -> mmap.mmap:
    import _posixshmem

    fd = _posixshmem.shm_open(name, os.O_RDWR, mode=0o600)
    try:
        size = os.fstat(fd).st_size
        if size < total:
            raise OSError(f"segment is {size} bytes, expected {total}")
        return mmap.mmap(fd, total)
    finally:
        os.close(fd)


class _Futex:
    """FUTEX_WAIT / FUTEX_WAKE on a 32-bit word of a shared mapping, through libc's syscall()."""

    SYS_FUTEX = 202  # x86-64
    WAIT, WAKE = 0, 1

    def __init__(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self._syscall = libc.syscall
        self._syscall.restype = ctypes.c_long

    def wait(self, address: int, expected: int, timeout_ns: int) -> None:
        """Sleep while the word at `address` equals the low 32 bits of `expected`, at most
        `timeout_ns` (returns at once if it already differs)."""
        spec = _Timespec(timeout_ns // 1_000_000_000, timeout_ns % 1_000_000_000)
        self._syscall(
            self.SYS_FUTEX,
            ctypes.c_void_p(address),
            self.WAIT,
            ctypes.c_int(expected & 0xFFFFFFFF),
            ctypes.byref(spec),
            None,
            0,
        )

    def wake(self, address: int) -> None:
        self._syscall(
            self.SYS_FUTEX, ctypes.c_void_p(address), self.WAKE, 0x7FFFFFFF, None, None, 0
        )


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def _futex() -> _Futex | None:
    if not sys.platform.startswith("linux") or not supported_isa():
        return None
    try:
        return _Futex()
    except (OSError, AttributeError):
        return None


class FlagBarrier:
    """Epoch barrier over a segment's flags; waiting spins `spin` checks, yields for up to
    `yield_s`, then sleeps.

    Words: rank r's epoch at r * stride, its `sleeping` word next to it, and the generation
    at world_size * stride. Every wait is bounded by `timeout_s` and raises TimeoutError
    naming the first rank whose flag had not reached the epoch.
    """

    def __init__(
        self,
        flags,
        rank: int,
        world_size: int,
        *,
        timeout_s: float,
        spin: int,
        label: str,
        nap_s: float = 1e-3,
        yield_s: float = 0.0,
    ) -> None:
        self._flags = flags
        stride = FLAG_STRIDE_BYTES // 8
        self._stride = stride
        self.rank, self.world_size = rank, world_size
        self._mine = rank * stride
        self._others = [j * stride for j in range(world_size) if j != rank]
        self._sleeping = [w + 1 for w in self._others]
        self._generation = world_size * stride
        self._generation_address = ctypes.addressof(flags) + self._generation * 8
        self.timeout_s, self.spin, self.nap_s, self.yield_s = timeout_s, spin, nap_s, yield_s
        self.label = label
        self.epoch = 0
        self._futex = _futex()

    def arrive_and_wait(self) -> None:
        """Publish the next epoch and wait until every rank has published it."""
        self.epoch = target = self.epoch + 1
        flags = self._flags
        flags[self._mine] = target
        for word in self._others:
            if flags[word] < target:
                self._wait(target)
                return
        self._release(target)

    def _all_arrived(self, target: int) -> bool:
        flags = self._flags
        for word in self._others:
            if flags[word] < target:
                return False
        return True

    def _release(self, target: int) -> None:
        """Every flag is at `target`: advance the generation and wake whoever sleeps."""
        flags = self._flags
        if flags[self._generation] >= target:
            return  # another rank saw it first
        flags[self._generation] = target
        if self._futex is not None:
            for word in self._sleeping:
                if flags[word]:
                    self._futex.wake(self._generation_address)
                    return

    def _wait(self, target: int) -> None:
        if self._spin_then_yield(target):
            self._release(target)
            return
        flags = self._flags
        deadline = time.monotonic() + self.timeout_s
        nap_ns = int(self.nap_s * 1e9)
        sleep_s = 20e-6
        flags[self._mine + 1] = 1
        try:
            while True:
                seen = flags[self._generation]
                if seen >= target:
                    return
                if self._all_arrived(target):
                    self._release(target)
                    return
                if time.monotonic() > deadline:
                    self._timeout(target)
                if self._futex is not None:
                    self._futex.wait(self._generation_address, seen, nap_ns)
                else:
                    time.sleep(sleep_s)
                    sleep_s = min(sleep_s * 2, self.nap_s)
        finally:
            flags[self._mine + 1] = 0

    def _spin_then_yield(self, target: int) -> bool:
        """The first two phases of a wait; True when every rank arrived in them."""
        flags, others = self._flags, self._others
        for _ in range(self.spin):
            for word in others:
                if flags[word] < target:
                    break
            else:
                return True
        if self.yield_s <= 0:
            return False
        end = time.monotonic() + self.yield_s
        sched_yield = os.sched_yield
        while True:
            sched_yield()
            for word in others:
                if flags[word] < target:
                    break
            else:
                return True
            if time.monotonic() > end:
                return False

    def _timeout(self, target: int) -> None:
        flags = self._flags
        late = [(w // self._stride, flags[w]) for w in self._others if flags[w] < target]
        peer, seen = late[0] if late else (self.rank, flags[self._mine])
        raise TimeoutError(
            timeout_message(self.label, self.rank, self.timeout_s, peer, target, seen)
        )


def timeout_message(
    label: str, rank: int, timeout_s: float, peer: int, target: int, seen: int
) -> str:
    """What a barrier that gave up says (the Python one here, the C one of shm_native)."""
    return (
        f"{label}: rank {rank} waited {timeout_s:g} s for rank {peer}'s flag to reach "
        f"epoch {target} (it is at {seen}); did rank {peer} die or stop calling all_reduce?"
    )
