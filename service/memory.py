"""Handing memory freed after large image decodes back to the operating system.

A large decode allocates and frees tens or hundreds of megabytes in blocks that glibc's malloc keeps
in its arenas (one per thread that allocated) rather than returning, because its threshold for
returning freed blocks straight to the system rises with every large block freed. The worker's
resident memory then stays at its peak long after the burst that caused it. ``malloc_trim`` returns
the free pages; on other C libraries (musl, macOS) there is nothing to call and nothing is done.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from collections.abc import Callable

logger = logging.getLogger(__name__)

# Below this much memory free inside malloc's arenas a trim is not worth walking them for.
TRIM_THRESHOLD_BYTES = 32 * 2**20


class _MallInfo2(ctypes.Structure):
    """glibc's ``struct mallinfo2`` (glibc 2.33 and later): every field a ``size_t``."""

    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost",
        )
    ]  # fmt: skip


class HeapTrimmer:
    """Calls glibc's ``malloc_trim(0)`` when malloc holds at least ``threshold`` bytes of freed memory
    (``mallinfo2``'s ``fordblks``, summed over every arena); where ``mallinfo2`` is missing, trims
    every time it is asked. Does nothing where the C library is not glibc."""

    def __init__(self, threshold: int = TRIM_THRESHOLD_BYTES) -> None:
        self.threshold = threshold
        self._trim, self._free_bytes = _glibc_functions()

    @property
    def available(self) -> bool:
        return self._trim is not None

    def free_bytes(self) -> int | None:
        """Memory malloc holds freed but not returned, where glibc can say."""
        return self._free_bytes() if self._free_bytes is not None else None

    def trim(self) -> bool:
        """Return malloc's free memory to the system if it holds enough of it; whether it trimmed."""
        if self._trim is None:
            return False
        held = self.free_bytes()
        if held is not None and held < self.threshold:
            return False
        self._trim(0)
        return True


def _glibc_functions() -> tuple[Callable[[int], int] | None, Callable[[], int] | None]:
    """``malloc_trim`` and a reader of ``mallinfo2().fordblks`` from the C library, None where absent."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        libc = None
    trim = getattr(libc, "malloc_trim", None)
    if trim is None:  # not glibc
        return None, None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    info = getattr(libc, "mallinfo2", None)
    if info is None:  # glibc before 2.33: the older mallinfo's int fields overflow at 2 GiB, so not used
        return trim, None
    info.argtypes, info.restype = [], _MallInfo2
    return trim, lambda: int(info().fordblks)
