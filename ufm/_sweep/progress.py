"""The sweep's progress bar on stderr, drawn by tqdm (optional: ``pip install ufm[progress]``).

``sweep [#####-----] 120/1000 runs  3.20 runs/s  04:35 left  compiling K=3 ...`` (runs/s counts this call only).
"""

from __future__ import annotations

import sys


def tqdm_class(required: bool):
    """``tqdm.tqdm``, or None when it is not installed (ImportError naming the extra when ``required``)."""
    try:
        from tqdm import tqdm
    except ImportError:
        if required:
            raise ImportError("progress=True needs tqdm: pip install tqdm (or 'ufm[progress]')") from None
        return None
    return tqdm


class Progress:
    """A tqdm bar over the runs of a sweep, or nothing when disabled (every method is then a no-op)."""

    def __init__(self, total: int, done: int, enabled: bool, stream=None):
        self.bar = None
        tqdm = tqdm_class(required=False) if enabled else None
        if tqdm is not None:
            self.bar = tqdm(
                total=total,
                initial=done,
                unit=" runs",
                file=stream or sys.stderr,
                desc="sweep",
                bar_format="{desc} [{bar:24}] {n_fmt}/{total_fmt} runs  {rate_fmt}  {remaining} left{postfix}",
                ascii=" #",
                mininterval=0.2,
            )

    def note(self, status: str) -> None:
        """A short status after the counters (e.g. "compiling K=3 widths=(4, 4)"); "" clears it."""
        if self.bar is not None:
            self.bar.set_postfix_str(status, refresh=True)

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
