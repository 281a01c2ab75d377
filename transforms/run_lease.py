"""Who owns a run's staging folder, and whether that run is provably gone.

A run's folder holds `lease.json`, renewed every RENEW_SECONDS while the run's launcher runs, and `owner.json`,
the process that runs it: host, boot, pid namespace, pid and the pid's start time (so that a pid reused later
is another process). A run is provably gone when
- its launcher released the lease as it ended without committing what it staged (its pipeline failed, or
  its commit step refused);
- it ran on this machine, since its last boot and in this pid namespace, and that process no longer runs
  (killed, out of memory);
- elsewhere, its lease was not renewed for LEASE_SECONDS (a remote launcher is known by its lease alone).
A file that cannot be read is not a proof of anything: its run counts as alive.

Files here are written whole or not at all: an object store's put is atomic, and on a local disk a file is
written under a temporary name and renamed into place.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from datetime import datetime, timezone
from typing import Any

from apache_beam.io.filesystems import FileSystems

log = logging.getLogger(__name__)
OWNER, LEASE = "owner.json", "lease.json"
LEASE_SECONDS = 180     # a lease not renewed for this long belongs to a run that is gone
RENEW_SECONDS = 30


def this_process() -> dict:
    """What tells this process from any other, now or later."""
    return {"host": socket.gethostname(), "boot": _boot_id(), "pid_namespace": _pid_namespace(), "pid": os.getpid(),
            "start": _started(os.getpid())}


def _boot_id() -> str | None:
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as handle:
            return handle.read().strip()
    except OSError:
        return None


def _pid_namespace() -> int | None:
    """Containers on one host share its name and boot, not their pids."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None


def _started(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), or None when it does not run."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
            return handle.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
        except OSError:
            return None
        return "running"


class Lease:
    """A run's claim on its staging folder. `start()`, `stop()` and `release()` are the launcher's."""

    def __init__(self, folder: str, table: str, run_id: str):
        self._folder = folder
        self._owner = {"table": table, "run_id": run_id, "process": this_process(),
                       "created_at": datetime.now(timezone.utc).isoformat()}
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._renew, name="staging-lease", daemon=True)

    def start(self) -> None:
        write_json(FileSystems.join(self._folder, LEASE), {"renewed_at": time.time(), "released": False})
        write_json(FileSystems.join(self._folder, OWNER), self._owner)      # after the lease: never one without
        self._thread.start()

    def stop(self) -> None:
        """Stop renewing: the run ended, and its commit step removed the folder if it could."""
        self._stopped.set()
        if self._thread.is_alive():
            self._thread.join()

    def release(self) -> None:
        """The run ended without committing what it staged: it is the next run's to adopt."""
        self.stop()
        try:
            self._write_lease(released=True)
        except OSError as err:          # then the lease runs out instead
            log.warning("could not release the staging lease in %s: %s", self._folder, err)

    def _renew(self) -> None:
        while not self._stopped.wait(RENEW_SECONDS):
            try:
                self._write_lease()
            except OSError as err:      # the next renewal tries again; a lease lasts LEASE_SECONDS
                log.warning("could not renew the staging lease in %s: %s", self._folder, err)

    def _write_lease(self, released: bool = False) -> None:
        if FileSystems.exists(FileSystems.join(self._folder, OWNER)):      # not once the folder is removed
            write_json(FileSystems.join(self._folder, LEASE), {"renewed_at": time.time(), "released": released})


def owner(folder: str) -> dict | None:
    """The owner record of a run's folder; None where there is none."""
    return read_json(FileSystems.join(folder, OWNER))


def is_gone(folder: str, owned_by: dict | None = None) -> bool:
    """Whether the run that owns `folder` is provably gone (or nothing owns it). Raises where its files cannot be
    read: an unreadable lease proves nothing."""
    owned_by = owned_by or owner(folder)
    if owned_by is None:
        return True
    lease = read_json(FileSystems.join(folder, LEASE)) or {}
    if lease.get("released"):
        return True
    process, here = owned_by.get("process") or {}, this_process()
    if all(process.get(key) == here[key] for key in ("host", "boot", "pid_namespace")):
        return _started(process["pid"]) != process["start"]
    return time.time() - float(lease.get("renewed_at", 0)) > LEASE_SECONDS


def write_json(path: str, value: Any) -> None:
    """Write the file whole or not at all."""
    data = json.dumps(value).encode()
    if "://" in path:                   # an object store's put is atomic
        with FileSystems.create(path) as handle:
            handle.write(data)
        return
    temporary = f"{path}.{uuid.uuid4().hex}.tmp"
    with FileSystems.create(temporary) as handle:
        handle.write(data)
    FileSystems.rename([temporary], [path])


def read_json(path: str) -> Any:
    """A JSON file's value; None where there is no such file. Any other failure raises."""
    if not FileSystems.exists(path):
        return None
    with FileSystems.open(path) as handle:
        return json.loads(handle.read())
