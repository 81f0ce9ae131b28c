"""Process-wide tuning, applied by process entry points (`cqrs project`, `cqrs run`,
`cqrs replay`, the bench's worker rounds), never by library code: a library that changes
the garbage collector changes it for whoever imported it."""

from __future__ import annotations

import gc


def tune_gc(threshold: int) -> None:
    """Collect garbage less often in a process that projects.

    Nearly everything a batch allocates (entry dicts, steps, argument lists) is freed by
    reference counting alone, yet every 700 allocations CPython runs a young-generation
    collection, and every 100th of those a full one over every object of the process
    (pydantic schemas, modules); docs/benchmarks.md has what that costs. The objects
    alive at this point (imports, schemas) are moved out of the collector's way for good
    (`gc.freeze`). 0 leaves the interpreter's defaults."""
    if threshold <= 0:
        return
    gc.freeze()
    _gen0, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(threshold, max(gen1, 20), max(gen2, 20))
