"""Sharing a batch of files among processes (``accelerate launch`` on several GPUs or machines), or one process.

The commands that work file by file (``stablesr restore``, ``stablesr fidelity-curve``, ``stablesr evaluate``) plan
the whole list first, identically on every process, and then:

- each process takes its share ([`Processes.share`]): a contiguous, balanced block of the planned list that depends
  only on the list's length and the number of processes, never on which files are already done, so reruns and
  processes that look at the output folder at different moments always agree on who owns which file;
- each file's random numbers come from the seed and the file's name ([`file_seed`]), never from the process or the
  file's place in the batch, so a file gives the same result alone, in any batch, and on any number of processes;
- the per-file results are gathered on every process ([`Processes.gather`]), so the main process can print one
  summary and every process can return the same exit code.

Rank, process count and device come from [`accelerate.PartialState`], which reads what the launcher set
(``accelerate launch``, ``torchrun``, ``srun`` + ``accelerate launch``); without a launcher it is one process and
nothing is gathered.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

__all__ = ["FileOutcome", "Processes", "count_outcomes", "file_seed", "launched_processes", "process_device"]

# A process that has finished its share waits in the final gather for the slowest one. torch's default collective
# timeout (30 min for gloo, 10 min for NCCL) is shorter than the imbalance of a large batch of mixed image sizes.
GATHER_TIMEOUT = timedelta(hours=24)


def file_seed(seed: int, name: str) -> int:
    """The seed of one file's sampling noise: a 63-bit hash of ``(seed, name)``.

    ``name`` is the input's file name (``"cat.png"``), so the result does not depend on the folder it was given as,
    the other files in the batch, their order, or which process restores it.
    """
    digest = hashlib.sha256(f"{int(seed)}\0{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


@dataclass(frozen=True)
class Processes:
    """The processes sharing one batch: this one's ``index`` among ``count`` (``local_index`` on its machine).

    Build it with [`launched_processes`]; ``Processes()`` is a single process.
    """

    index: int = 0
    count: int = 1
    local_index: int = 0
    device: str | None = None  # the process's own device under a launcher (``cuda:LOCAL_RANK`` or ``cpu``)

    @property
    def is_main(self) -> bool:
        """The process that prints notes and summaries and writes reports (process 0)."""
        return self.index == 0

    @property
    def is_local_main(self) -> bool:
        """The first process on its machine (the one that shows progress bars)."""
        return self.local_index == 0

    def share(self, n: int) -> range:
        """This process's positions in a planned list of ``n`` items: a contiguous block, the first ``n % count``
        processes taking one more; empty when there are more processes than items."""
        if n < 0:
            raise ValueError(f"a list cannot have {n} items")
        base, extra = divmod(n, self.count)
        start = self.index * base + min(self.index, extra)
        return range(start, start + base + (1 if self.index < extra else 0))

    def gather(self, items: Iterable[Any]) -> list[Any]:
        """Every process's ``items`` (picklable), concatenated in process order, on every process. All processes
        must call it (it waits for the others); with one process it returns ``list(items)``."""
        items = list(items)
        if self.count == 1:
            return items
        from accelerate.utils import gather_object

        return gather_object(items)

    @contextlib.contextmanager
    def local_main_first(self) -> Iterator[None]:
        """Run the body on the first process of each machine, then on the others there (e.g. loading a model that is
        converted and cached on first use: one process per machine converts it, the others read the cache). All
        processes must enter it."""
        if self.count == 1:
            yield
            return
        from accelerate import PartialState

        with PartialState().local_main_process_first():
            yield


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def launched_processes(device: str = "auto") -> Processes:
    """The processes of this run, as the launcher started them (a single one without a launcher).

    Args:
        device: the device option of the command. ``"cpu"`` (or ``ACCELERATE_USE_CPU``, set by ``accelerate launch
            --cpu``) connects the processes with gloo instead of NCCL, so no GPU is touched.
    """
    from accelerate import PartialState

    cpu = device == "cpu" or _env_flag("ACCELERATE_USE_CPU")
    state = PartialState(cpu=cpu, timeout=GATHER_TIMEOUT)
    if state.num_processes == 1:
        return Processes()
    own = state.device
    return Processes(index=state.process_index, count=state.num_processes, local_index=state.local_process_index,
                     device="cpu" if own.type == "cpu" else str(own))


def process_device(device: str, processes: Processes) -> tuple[str, str | None]:
    """The device this process runs on, and a warning for the main process to print (or None).

    One process: ``device`` as ``--device`` gives it (``auto`` resolved). Several: ``auto`` and a bare device type
    (``cuda``) become the process's own device (``cuda:LOCAL_RANK``); an explicit index (``cuda:0``) is kept, with a
    warning that every process then shares that device.
    """
    from .loading import resolve_device

    if processes.count == 1 or processes.device is None:
        return resolve_device(device), None
    own = processes.device
    if device in ("auto", own.split(":")[0]):
        return own, None
    if ":" in device:
        return device, (f"--device {device} puts all {processes.count} processes on one device; pass --device "
                        f"{device.split(':')[0]} (or auto) to give each process its own")
    return device, None


@dataclass(frozen=True)
class FileOutcome:
    """What happened to one planned file: ``status`` is ``"done"``, ``"skipped"`` (outputs exist), ``"failed"``,
    ``"stopped"`` (the error that stopped its process's share, e.g. a full disk) or ``"not_attempted"``."""

    index: int
    status: str
    message: str = ""


def count_outcomes(outcomes: Sequence[FileOutcome]) -> Counter:
    """``{status: number of files}`` over gathered outcomes."""
    return Counter(o.status for o in outcomes)
