"""A rank's watchdog: ends the rank after `--timeout` seconds without progress, naming the
peers whose heartbeat stopped (dead, stopped or stuck), instead of hanging in a collective."""

from __future__ import annotations

import datetime
import os
import signal
import sys
import threading
import time

import torch.distributed as dist

from bench.environment import get
from bench.run.hardware import host_id

__all__ = ["Watchdog", "EXIT_WATCHDOG"]

EXIT_WATCHDOG = 3  # a rank ended by its watchdog: no progress for --timeout seconds


class Watchdog:
    """Ends this rank when no progress is made for `timeout_s` (a hung peer or kernel).

    Once the process group is up, `attach_heartbeat()` makes every rank bump a counter in the
    rendezvous store each second (from a thread of its own), so that the rank which gives up
    can name the peers that went silent: dead, stopped, or stuck where no Python runs.
    """

    def __init__(self, rank: int, timeout_s: float) -> None:
        self.rank, self.timeout_s = rank, timeout_s
        self.where = "start-up"
        self._last = time.monotonic()
        self._stop = threading.Event()
        self._store = None
        self._world_size = 1
        self._ending = threading.Lock()  # the watchdog or the main thread ends the rank, once
        # the rank in the thread name lets `top -H` (and the fault tests) tell ranks apart
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"bench-wd-r{rank}")
        self._thread.start()

    def beat(self, where: str) -> None:
        self.where, self._last = where, time.monotonic()

    def attach_heartbeat(self, world_size: int, tag: str) -> None:
        """Start the heartbeat through a store client of our own; without one, no names."""
        try:
            store = dist.TCPStore(
                get("MASTER_ADDR"),
                int(get("MASTER_PORT")),
                is_master=False,
                timeout=datetime.timedelta(seconds=10),
            )
        except Exception:
            return
        self._store = dist.PrefixStore(f"bench-heartbeat/{tag}", store)
        self._world_size = world_size
        self._store.set(f"at/{self.rank}", self.where)
        self._store.set(f"pid/{self.rank}", f"{host_id()}|{os.getpid()}")
        threading.Thread(target=self._heartbeat, daemon=True, name=f"bench-hb-r{self.rank}").start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(1.0):
            try:
                self._store.add(f"alive/{self.rank}", 1)
                self._store.set(f"at/{self.rank}", self.where)
            except Exception:
                return  # the store is gone; the watchdog still ends this rank on its own

    def silent_peers(self, wait_s: float = 2.5) -> dict[int, tuple[str, str]]:
        """Peers whose heartbeat did not move within `wait_s`: rank -> (where, host|pid)."""
        store, found = self._store, {}
        if store is None:
            return found

        def text(key: str) -> str:
            return store.get(key).decode() if store.check([key]) else "?"

        def probe() -> None:
            ranks = [r for r in range(self._world_size) if r != self.rank]
            before = {r: store.add(f"alive/{r}", 0) for r in ranks}
            time.sleep(wait_s)
            for r in ranks:
                if store.add(f"alive/{r}", 0) == before[r]:
                    found[r] = (text(f"at/{r}"), text(f"pid/{r}"))

        thread = threading.Thread(target=probe, daemon=True)
        thread.start()
        thread.join(wait_s + 5.0)
        return found

    def _run(self) -> None:
        while not self._stop.wait(min(1.0, self.timeout_s / 4)):
            idle = time.monotonic() - self._last
            if idle > self.timeout_s:
                if not self._ending.acquire(blocking=False):
                    return  # the main thread is already ending this rank
                silent = self.silent_peers()
                # every peer still beats: one point may just take longer than --timeout
                who = (
                    "no peer went silent: a point of --iters iterations may take longer than "
                    f"--timeout {self.timeout_s:g} s (raise --timeout or lower --iters), or a "
                    "collective or kernel is stuck"
                )
                if silent:
                    who = "silent: " + _describe(silent) + " (dead, stopped or stuck)"
                print(
                    f"bench: rank {self.rank}: no progress for {idle:.0f} s at {self.where}; "
                    f"{who}; ending this rank",
                    file=sys.stderr,
                    flush=True,
                )
                _kill_local(silent.values())
                os._exit(EXIT_WATCHDOG)

    def end_silent_peers(self) -> None:
        """On an error (a peer-side timeout, a closed connection): name the silent peers and
        SIGKILL those on this host, as the watchdog would."""
        if not self._ending.acquire(blocking=False):
            time.sleep(10.0)  # the watchdog is at it and will end the process
            return
        silent = self.silent_peers()
        if silent:
            print(
                f"bench: rank {self.rank}: failed at {self.where}; silent: "
                f"{_describe(silent)} (dead, stopped or stuck)",
                file=sys.stderr,
                flush=True,
            )
            _kill_local(silent.values())

    def stop(self) -> None:
        self._stop.set()


def _describe(silent: dict[int, tuple[str, str]]) -> str:
    return ", ".join(f"rank {r} (last at {where})" for r, (where, _) in sorted(silent.items()))


def _kill_local(peers) -> None:
    """SIGKILL silent peers on this host: a stopped rank ignores the launcher's SIGTERM, and
    torch's process context would wait 30 s before its own SIGKILL."""
    here = host_id()
    for _, ident in peers:
        host, _, pid = ident.rpartition("|")
        if host == here and pid.isdigit():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except OSError:
                pass
