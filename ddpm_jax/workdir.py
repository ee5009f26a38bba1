"""The run directory: its lock, its records and output names that never collide.

* `prepare(workdir)` creates a training workdir and checks it is writable;
  `require_existing(workdir)` is what sample and eval modes use (they never create
  one).
* `TrainLock` makes one trainer own a workdir: `<workdir>/train.lock` holds the
  owner's host, pid and start time, written by process 0 (one lock per job, not
  per process) and refreshed by a heartbeat thread. A second trainer is refused
  with a line naming the holder. A lock whose process is gone (same host, pid not
  running) or whose heartbeat stopped (`STALE_AFTER_S`, for another host) is taken
  over, so a killed job never blocks its restart.
* Records: `config.json` describes the checkpoints (written by training, once its
  first checkpoint is saved, or by `import_checkpoint`); `runs.jsonl` gets one line
  per run of any mode, an import's as mode 'import' (time, mode, host, config and the
  files it wrote), so no run's record replaces another's.
* `unique_stem(directory, stem, suffixes)` gives `<stem>`, or `<stem>_1`,
  `<stem>_2`... when a file of that name is taken: no mode overwrites a result.
"""

import datetime
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
from etils import epath

from ddpm_jax import config_lib

logger = logging.getLogger('ddpm_jax')

LOCK_NAME = 'train.lock'
CONFIG_RECORD = 'config.json'
RUN_LOG = 'runs.jsonl'
HEARTBEAT_S = 30.0  # How often the lock holder refreshes the lock's time stamp.
STALE_AFTER_S = 600.0  # A lock not refreshed for this long belongs to a dead job.


def prepare(workdir: str) -> epath.Path:
    """Creates a training `workdir` and checks that it is writable (before any compile).

    Raises:
        ValueError: If the directory cannot be created or written.
    """
    if not workdir:
        raise ValueError('--workdir must be set.')
    path = epath.Path(workdir)
    probe = path / f'.write_probe_{jax.process_index()}_{os.getpid()}'
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_text('ok')
        probe.unlink()
    except OSError as e:
        raise ValueError(f'--workdir={workdir} is not writable: {e}') from e
    return path


def require_existing(workdir: str) -> epath.Path:
    """The workdir of a trained run, for sample and eval modes (never created).

    Raises:
        FileNotFoundError: No such directory.
    """
    if not workdir:
        raise ValueError('--workdir must be set.')
    path = epath.Path(workdir)
    if not path.is_dir():
        raise FileNotFoundError(f'--workdir={workdir} does not exist; sample and eval modes '
                                'read a trained run and never create one.')
    return path


def unique_stem(directory: epath.Path, stem: str, suffixes: tuple[str, ...]) -> epath.Path:
    """`directory/<stem>`, or `<stem>_1`, `<stem>_2`, ... : the first for which no
    `<stem><suffix>` file exists yet, so that a new result never replaces an old one."""
    directory = epath.Path(directory)
    candidate, k = stem, 0
    while any((directory / f'{candidate}{suffix}').exists() for suffix in suffixes):
        k += 1
        candidate = f'{stem}_{k}'
    return directory / candidate


def write_config_record(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Writes the training config to `<workdir>/config.json` (process 0 only)."""
    if jax.process_index() != 0:
        return
    (epath.Path(workdir) / CONFIG_RECORD).write_text(
        json.dumps(config_lib.to_json_dict(config), indent=2, sort_keys=True))


def append_run_record(workdir: str, mode: str, config: ml_collections.ConfigDict,
                      outputs: Mapping[str, Any] | None = None) -> None:
    """Appends one line for this run to `<workdir>/runs.jsonl` (process 0 only)."""
    if jax.process_index() != 0:
        return
    record = {'time': datetime.datetime.now(datetime.timezone.utc).isoformat(
        timespec='seconds'), 'mode': mode, 'host': socket.gethostname(), 'pid': os.getpid(),
        'outputs': dict(outputs or {}), 'config': config_lib.to_json_dict(config)}
    with open(os.fspath(epath.Path(workdir) / RUN_LOG), 'a', encoding='utf-8') as f:
        f.write(json.dumps(record, sort_keys=True, default=str) + '\n')


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class WorkdirLockedError(ValueError):
    """Another live trainer holds the workdir."""


class TrainLock:
    """One trainer per workdir; a context manager (see the module docstring).

    Only process 0 touches the file; other processes of the job share its lock.
    """

    def __init__(self, workdir: str):
        self.path = epath.Path(workdir) / LOCK_NAME
        self._stop = threading.Event()
        self._thread = None
        self._owner = None

    def _holder(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None  # Gone, or half-written by a dying process.

    def _is_stale(self, holder: Mapping[str, Any] | None) -> bool:
        if holder is None:
            return True
        if holder.get('host') == socket.gethostname() and not _pid_running(int(holder['pid'])):
            return True
        try:
            age = time.time() - os.path.getmtime(os.fspath(self.path))
        except OSError:
            return True
        return age > STALE_AFTER_S

    def acquire(self) -> None:
        """Takes the lock or raises `WorkdirLockedError` naming the holder."""
        if jax.process_index() != 0:
            return
        self._owner = {'host': socket.gethostname(), 'pid': os.getpid(),
                       'since': datetime.datetime.now(datetime.timezone.utc).isoformat(
                           timespec='seconds')}
        for _ in range(3):
            try:
                fd = os.open(os.fspath(self.path), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if not self._is_stale(holder):
                    raise WorkdirLockedError(
                        f'{self.path.parent} is in use by another trainer (host '
                        f'{holder.get("host")}, pid {holder.get("pid")}, since '
                        f'{holder.get("since")}); stop it, or delete {self.path} if that job '
                        'is dead.') from None
                logger.warning('Taking over the stale lock %s of host %s, pid %s.', self.path,
                               (holder or {}).get('host'), (holder or {}).get('pid'))
                try:
                    self.path.unlink()
                except FileNotFoundError:
                    pass
                continue
            with os.fdopen(fd, 'w') as f:
                f.write(json.dumps(self._owner))
            self._thread = threading.Thread(target=self._heartbeat, daemon=True)
            self._thread.start()
            return
        raise WorkdirLockedError(f'Could not take the lock {self.path}.')

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(os.fspath(self.path))
            except OSError:
                return

    def release(self) -> None:
        """Releases the lock if this process holds it."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        if self._holder() == self._owner:
            self.path.unlink()

    def __enter__(self) -> 'TrainLock':
        self.acquire()
        return self

    def __exit__(self, *exc) -> bool:
        self.release()
        return False
