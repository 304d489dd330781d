"""Process memory readings shared by the memory benchmarks (Linux ``/proc``)."""

from __future__ import annotations


def status_kb(field: str) -> int:
    """A ``/proc/self/status`` field in kB, e.g. ``VmRSS`` (resident now) or ``VmHWM`` (peak since the last reset)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak() -> bool:
    """Reset ``VmHWM`` to the current RSS (``/proc/self/clear_refs`` = 5); False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
