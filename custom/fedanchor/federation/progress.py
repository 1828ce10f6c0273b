"""A progress bar over a site's local steps, only when a person is watching (a terminal); none in logs or CI."""
from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import IO, Callable, Iterator

StepCallback = Callable[[int, int, float], None]


@contextmanager
def local_step_bar(description: str, total: int, stream: IO[str] | None = None) -> Iterator[StepCallback | None]:
    """Yield a ``progress(step, total, loss)`` callback drawing a tqdm bar on ``stream``, or None when it is no tty."""
    stream = stream if stream is not None else sys.stderr
    if not (hasattr(stream, "isatty") and stream.isatty()):
        yield None
        return
    from tqdm import tqdm

    bar = tqdm(total=total, desc=description, file=stream, leave=False, dynamic_ncols=True, unit="step")
    try:
        def update(step: int, steps: int, loss: float) -> None:
            bar.update(step - bar.n)
            bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
        yield update
    finally:
        bar.close()
