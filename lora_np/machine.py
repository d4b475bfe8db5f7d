"""The machine the benchmark runs on: what it is, how busy it is, and how its allocator behaves.

Everything here is specific to an operating system or a C library, and none of it is LoRA;
``python -m lora_np.bench`` uses it to say under which conditions its timings were taken:

* ``machine_info``      — cores, the BLAS NumPy links and its thread count, NumPy's version;
* ``MachineLoad``       — the share of the machine's CPU time *other* processes used (Linux
  ``/proc/stat``), so a disturbed run can say so;
* ``minor_faults``      — this process's minor page faults (``getrusage``, Unix);
* ``keep_freed_memory`` — glibc's ``mallopt``: keep freed arrays in the process, as a training
  loop with a caching allocator would. ``import lora_np`` never calls it; ``train.train`` does,
  once per process, before its first step (``tune_allocator_for_training``).

Each function degrades to "unknown" (None, 0 or a default) where its source is missing, so the
benchmark still runs on macOS or Windows.
"""

from __future__ import annotations

import ctypes
import glob
import os
import sys
from pathlib import Path

import numpy as np

from .validate import check_choice

try:                                    # Unix only: page-fault counts of this process
    import resource
except ImportError:                     # pragma: no cover - Windows
    resource = None

__all__ = ["machine_info", "MachineLoad", "minor_faults", "MALLOC_ENV", "malloc_env",
           "keep_freed_memory", "tune_allocator_for_training", "allocator_setting", "KEEP_LIMIT"]


def machine_info() -> dict:
    """Cores, BLAS and its thread count (None if it cannot be asked), NumPy version."""
    info = {"cpu_count": os.cpu_count(), "numpy": np.__version__, "blas": "unknown",
            "blas_threads": None}
    try:
        deps = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        info["blas"] = f"{deps.get('name', '?')} {deps.get('version', '')}".strip()
    except Exception:                                       # pragma: no cover - old NumPy
        pass
    info["blas_threads"] = _openblas_threads()
    return info


def _openblas_threads() -> int | None:
    """The thread count of the OpenBLAS bundled with a NumPy wheel (``numpy.libs``), or None."""
    libdir = Path(np.__file__).resolve().parent.parent / "numpy.libs"
    for lib in glob.glob(str(libdir / "*openblas*.so*")):
        try:
            handle = ctypes.CDLL(lib)
        except OSError:                                     # pragma: no cover
            continue
        for name in ("scipy_openblas_get_num_threads64_", "openblas_get_num_threads64_",
                     "openblas_get_num_threads"):
            if hasattr(handle, name):
                return int(getattr(handle, name)())
    return None


# ------------------------------------------------------------------------------- CPU load

def _cpu_jiffies():
    """(busy, total) CPU ticks of the whole machine from /proc/stat, or None off Linux."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)       # idle + iowait
    return sum(fields[:8]) - idle, sum(fields[:8])


class MachineLoad:
    """How much of the machine *other* processes used while the benchmark ran: the whole
    machine's busy CPU time (/proc/stat) minus this process's own (os.times, all threads),
    as a fraction of all cores' time. ~0 means the timings are clean; a multi-threaded BLAS
    waits for its slowest thread, so it slows down more than the share alone suggests."""

    def __init__(self):
        self.start, self.own0 = _cpu_jiffies(), os.times()

    def others_fraction(self) -> float | None:
        """The share in [0, 1] since this object was made, or None where it cannot be read."""
        end, own1 = _cpu_jiffies(), os.times()
        if self.start is None or end is None:
            return None
        tick = os.sysconf("SC_CLK_TCK")
        busy, total = end[0] - self.start[0], end[1] - self.start[1]
        own = (own1.user + own1.system - self.own0.user - self.own0.system) * tick
        return max(0.0, (busy - own) / total) if total > 0 else None


def minor_faults() -> int:
    """Minor page faults of this process so far (0 where ``resource`` is missing). A minor
    fault is the kernel mapping a page in again, e.g. memory the allocator had returned to it
    and that the next step touches."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt if resource else 0


# ------------------------------------------------------------------------------ allocator

#: glibc settings that keep freed memory in the process instead of returning it to the kernel
#: (which then page-faults it back in on the next step); glibc reads them once, at start-up
MALLOC_ENV = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_")
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3           # glibc's mallopt parameter numbers
KEEP_LIMIT = 1 << 30                                     # 1 GiB


def malloc_env() -> str:
    """The ``MALLOC_*`` settings of ``MALLOC_ENV`` found in the environment, or ""."""
    return ", ".join(f"{k}={os.environ[k]}" for k in MALLOC_ENV if k in os.environ)


def keep_freed_memory() -> str:
    """Ask glibc's allocator to keep freed memory in this process; return what was done.

    By default glibc gives every large array (above its mmap threshold: 128 KiB at start,
    raised as such arrays are freed, to 32 MiB at most) its own ``mmap`` and returns it to the
    kernel when NumPy frees it, and trims the heap top; the next training step asks for the
    same sizes again and the kernel hands the pages back one page fault at a time. A training
    loop does not want that: PyTorch keeps freed GPU memory in its caching allocator, and
    Intel's CPU tuning guide recommends jemalloc/tcmalloc for the same reason.
    ``mallopt(M_TRIM_THRESHOLD)`` and ``mallopt(M_MMAP_THRESHOLD)`` at ``KEEP_LIMIT`` make glibc
    reuse freed memory instead, for this process only. ``MALLOC_*`` variables already set in
    the environment are left to rule.
    """
    if malloc_env():
        return malloc_env() + " (from the environment)"
    try:
        libc = ctypes.CDLL(None)
        ok = all(libc.mallopt(param, KEEP_LIMIT) == 1 for param in (_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD))
    except (OSError, AttributeError, TypeError):       # not glibc (macOS, musl, Windows)
        ok = False
    if not ok:
        return "defaults (mallopt not available on this C library)"
    return f"keeps freed memory (mallopt trim and mmap thresholds {KEEP_LIMIT >> 20} MiB)"


_TRAINING_ALLOCATOR: list[str] = []          # what tune_allocator_for_training did, once


def tune_allocator_for_training() -> str:
    """``keep_freed_memory`` once per process, for a training loop: ``lora_np.train.train``
    calls it before its first step (``import lora_np`` does not), so that a training run does
    not page-fault its arrays back in every step. Later calls return the first call's
    description and do nothing. A process that wants glibc's defaults sets a ``MALLOC_*``
    variable (which then rules) before it starts."""
    if not _TRAINING_ALLOCATOR:
        _TRAINING_ALLOCATOR.append(keep_freed_memory())
    return _TRAINING_ALLOCATOR[0]


def allocator_setting(mode: str) -> str:
    """Apply ``mode`` and describe the allocator the timings run with: ``"keep"`` calls
    ``keep_freed_memory``; ``"default"`` changes nothing (glibc's defaults, or the
    ``MALLOC_*`` environment if set)."""
    if check_choice("mode", mode, ("keep", "default")) == "keep":
        return keep_freed_memory()
    return malloc_env() or "defaults"


#: environment variables that set the number of BLAS threads (OpenBLAS, OpenMP builds, MKL)
BLAS_THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def restart_with_one_blas_thread(module: str) -> None:
    """Replace this process by ``python -m <module>`` with the same arguments and one BLAS
    thread, unless the user has set a thread count (then theirs is used, and nothing happens).

    The commands multiply small matrices, for which a second BLAS thread mostly waits, and one
    thread keeps the summation order — and so every printed digit — the same from run to run.
    BLAS reads these variables only when NumPy is imported, which has happened by the time a
    command runs, hence the restart.
    """
    if any(v in os.environ for v in BLAS_THREAD_VARIABLES):
        return
    env = dict(os.environ, **{v: "1" for v in BLAS_THREAD_VARIABLES})
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, "-m", module, *sys.argv[1:]], env)
