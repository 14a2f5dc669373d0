"""A lease on a folder (local or any storage URL): one writer at a time, and a dead writer's claim expires.

Why: a retried task (KFP, Airflow) can start while the first attempt's pod or process still runs.
Without a lease both train into the same output folder, writing the same checkpoints; with
resume=false the second overwrites the first. With one, the second attempt waits while it cannot
tell whether the holder is alive, and stops naming the holder as soon as the holder renews.

How: the lease is FOLDER/.lease/<generation>.json, created with `create_exclusive` (O_EXCL
locally, x-oss-forbid-overwrite on OSS), so of two claimants exactly one gets a generation. The
holder rewrites its object every `ttl / 3` seconds (a daemon thread); an object not renewed for
`ttl` seconds is expired (at once when its process ran on this machine and is gone), and the next
claimant takes the next generation. The highest generation
is the lease; a holder that finds a higher one has lost it (it was presumed dead) and says so.
Expiry compares the holder's wall clock with the reader's: hosts must agree to well within `ttl`.

Hand-written: neither fsspec nor oss2 offers leases; tenacity-style retries do not hold state.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from imlt.trainer import storage
from imlt.trainer.storage.errors import StorageError
from imlt.trainer.storage.urls import local_path

log = logging.getLogger(__name__)

LEASE_SECONDS = 60.0  # a lease not renewed for this long is expired (the holder is presumed dead)
LEASE_FOLDER = ".lease"
_NAME = re.compile(r"(\d{8})\.json")


class LeaseHeldError(StorageError):
    """Another live process holds the lease; the message names it."""


@dataclass(frozen=True)
class Holder:
    generation: int
    info: dict[str, Any]  # holder, host, pid, token, acquired_at, renewed_at, ttl, purpose

    def age(self) -> float:
        return time.time() - float(self.info.get("renewed_at", 0))

    def expired(self) -> bool:
        """Not renewed for its ttl, or its process is gone (known at once when it ran on this machine)."""
        if self.age() > float(self.info.get("ttl", LEASE_SECONDS)):
            return True
        process = self.info.get("process")
        here = process_identity(os.getpid())
        if not process or here is None or not isinstance(self.info.get("pid"), int):
            return False
        same_namespace = process.split(":")[:2] == here.split(":")[:2]  # same boot, same pid namespace
        return same_namespace and process_identity(self.info["pid"]) != process

    def describe(self) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(self.info.get("acquired_at", 0))))
        return (f"{self.info.get('holder', '?')} ({self.info.get('purpose', 'lease')} since {since}, "
                f"renewed {self.age():.0f}s ago)")


def process_identity(pid: int) -> str | None:
    """boot id : pid namespace : pid : start time, on Linux; None elsewhere or for no such process.

    Lets a claimant on the same machine see at once that a holder was killed (no waiting for the
    ttl), without mistaking a reused pid, or a process in another container, for the holder.
    """
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        namespace = os.stat("/proc/self/ns/pid").st_ino
        started = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None
    return f"{boot}:{namespace}:{pid}:{started}"


class Lease:
    """`with Lease(folder): ...` holds FOLDER/.lease/ while the block runs.

    `wait`: how long to wait for a lease whose holder neither renews nor expires yet (default:
    until it would expire); a holder seen renewing is alive, and LeaseHeldError names it at once.
    """

    def __init__(self, folder: str, *, purpose: str = "lease", ttl: float | None = None,
                 wait: float | None = None) -> None:
        self.folder = folder
        self.purpose = purpose
        self.ttl = float(LEASE_SECONDS if ttl is None else ttl)
        self.wait = self.ttl * 1.5 if wait is None else wait
        self.generation: int | None = None
        self.lost_to: Holder | None = None
        self._token = uuid.uuid4().hex
        self._acquired_at = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # a folder the lease itself brought into being is removed with it when nothing else landed there
        self._made_folder = storage.is_local(folder) and not os.path.exists(local_path(folder))

    # -- the objects ---------------------------------------------------------------------------

    def _url(self, generation: int) -> str:
        return storage.join(self.folder, LEASE_FOLDER, f"{generation:08d}.json")

    def _generations(self) -> list[int]:
        found = []
        for url in storage.list_files(storage.join(self.folder, LEASE_FOLDER)):
            m = _NAME.fullmatch(url.rsplit("/", 1)[-1])
            if m:
                found.append(int(m.group(1)))
        return sorted(found)

    def _read(self, generation: int) -> Holder | None:
        try:
            info = json.loads(storage.read_text(self._url(generation)))
        except (FileNotFoundError, json.JSONDecodeError):
            return None  # released meanwhile, or being created (a local O_EXCL file is empty for a moment)
        return Holder(generation, info) if isinstance(info, dict) else None

    def _payload(self) -> bytes:
        now = time.time()
        return json.dumps({
            "holder": f"{socket.gethostname()}:{os.getpid()}", "host": socket.gethostname(), "pid": os.getpid(),
            "token": self._token, "purpose": self.purpose, "acquired_at": self._acquired_at or now,
            "renewed_at": now, "ttl": self.ttl, "process": process_identity(os.getpid()),
        }).encode()

    # -- acquire, renew, release ---------------------------------------------------------------------

    def acquire(self) -> Lease:
        deadline = time.monotonic() + self.wait
        seen: Holder | None = None
        while True:
            generations = self._generations()
            current = self._read(generations[-1]) if generations else None
            if generations and current is None and time.monotonic() < deadline:
                time.sleep(min(0.2, self.ttl / 10))  # a lease object being created or released: look again
                continue
            if current is None or current.expired():
                generation = (generations[-1] if generations else 0) + 1
                self._acquired_at = time.time()
                if storage.create_exclusive(self._url(generation), self._payload()):
                    self.generation = generation
                    if current is not None:
                        log.warning("%s: took over the expired lease of %s", self.folder, current.describe())
                    for old in generations:  # expired or released generations: not needed any more
                        storage.delete(self._url(old))
                    self._start_renewing()
                    return self
                continue  # another claimant got this generation first: look at it
            alive = seen is not None and (current.generation != seen.generation
                                          or current.info.get("renewed_at") != seen.info.get("renewed_at"))
            if alive or time.monotonic() >= deadline:
                raise LeaseHeldError(
                    f"{self.folder}: in use by {current.describe()}; another attempt is still writing this folder. "
                    f"Stop it, or wait: a lease not renewed for {current.info.get('ttl', self.ttl):.0f}s expires"
                )
            if seen is None:
                log.warning("%s: held by %s; waiting up to %.0fs to see whether it is alive",
                            self.folder, current.describe(), self.wait)
            seen = current
            time.sleep(min(self.ttl / 6, max(0.0, deadline - time.monotonic())) or 0.01)

    def _start_renewing(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._renew_loop, name=f"lease-{self.folder}", daemon=True)
        self._thread.start()

    def _renew_loop(self) -> None:
        assert self.generation is not None
        while not self._stop.wait(self.ttl / 3):
            try:
                newer = [g for g in self._generations() if g > self.generation]
                if newer:
                    self.lost_to = self._read(newer[-1])
                    log.error("%s: lease lost to %s (this process was presumed dead); another attempt now writes "
                              "this folder", self.folder, self.lost_to.describe() if self.lost_to else "another holder")
                    return
                storage.write_bytes(self._url(self.generation), self._payload())
            except Exception as e:  # storage briefly unreachable: the next renewal may succeed
                log.warning("%s: could not renew the lease: %s", self.folder, e)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self.generation is not None and self.lost_to is None:
            try:
                storage.delete(self._url(self.generation))
            except Exception as e:  # it expires on its own
                log.warning("%s: could not release the lease: %s", self.folder, e)
            if storage.is_local(self.folder):  # no empty .lease/ left behind; rmdir fails if a claimant is in it
                with contextlib.suppress(OSError):
                    os.rmdir(local_path(storage.join(self.folder, LEASE_FOLDER)))
                    if self._made_folder:
                        os.rmdir(local_path(self.folder))
        self.generation = None

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()


def training_lease(output_dir: str, holder: bool) -> contextlib.AbstractContextManager[Any]:
    """The output folder's lease for the process that holds it for the job (rank 0); nothing for the others."""
    return Lease(output_dir, purpose="training") if holder else contextlib.nullcontext()


def current_holder(folder: str) -> Holder | None:
    """Who holds FOLDER's lease now (None when free or expired)."""
    probe = Lease(folder)
    generations = probe._generations()
    holder = probe._read(generations[-1]) if generations else None
    return None if holder is None or holder.expired() else holder
