"""``progress=True`` for the samplers: a tqdm bar when tqdm is installed, silence otherwise.

tqdm is an optional extra (``pip install tqdm``), never a dependency of vdmpp-samplers: it is
imported lazily, only when a caller asks for a bar.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

__all__ = ["steps"]

T = TypeVar("T")


def _tqdm() -> Any:
    """tqdm's auto class (notebook or console), or None when tqdm is not installed."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm


def steps(items: Iterable[T], enabled: bool, desc: str, total: int, ev: Any = None) -> Iterator[T]:
    """Yield ``items``; with ``enabled`` and tqdm installed, advance a bar showing the NFE so far.

    ``ev``: the sampler's evaluator (its ``nfe`` is shown after each step). The bar is closed when
    the loop ends, breaks or raises.
    """
    tqdm = _tqdm() if enabled else None
    if tqdm is None:
        yield from items
        return
    bar = tqdm(total=total, desc=desc, unit="step", leave=False)
    try:
        for item in items:
            yield item
            if ev is not None:
                bar.set_postfix(nfe=ev.nfe, refresh=False)
            bar.update(1)
    finally:
        bar.close()
