"""Metric writers: one stdout line per log step plus TensorBoard event files.

Only process 0 writes (other processes get a no-op writer), so multi-host runs
produce one log. TensorBoard files are written with tensorboardX, which needs no
TensorFlow. A tqdm progress bar is shown only when stdout is an interactive
terminal, so redirected logs stay clean.
"""

import logging
import sys
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

logger = logging.getLogger('ddpm_jax')


def _format_value(value: float) -> str:
    if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e4):
        return f'{value:.4e}'
    return f'{value:.5g}'


class MetricWriter:
    """Writes scalars to stdout and TensorBoard, and drives an optional progress bar.

    Args:
        logdir: Directory for TensorBoard event files (created if needed).
        enabled: Write anything at all; default: only on process 0.
        total_steps: Length of the progress bar.
        initial_step: Where the progress bar starts (non-zero on resume).
        progress_bar: Show a tqdm bar; default: when stdout is a TTY.
    """

    def __init__(self, logdir: str, *, enabled: bool | None = None,
                 total_steps: int | None = None, initial_step: int = 0,
                 progress_bar: bool | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self._tb = None
        self._bar = None
        if not self.enabled:
            return
        import tensorboardX  # Imported lazily: only process 0 needs it.
        self._tb = tensorboardX.SummaryWriter(logdir=logdir)
        if progress_bar is None:
            progress_bar = sys.stdout.isatty()
        if progress_bar and total_steps:
            import tqdm
            self._bar = tqdm.tqdm(total=total_steps, initial=initial_step,
                                  dynamic_ncols=True, unit='step')

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        """Logs `scalars` (name -> number) at `step` to stdout and TensorBoard."""
        if not self.enabled:
            return
        scalars = {k: float(np.asarray(v)) for k, v in scalars.items()}
        line = f'step {step}: ' + ', '.join(
            f'{k}={_format_value(v)}' for k, v in sorted(scalars.items()))
        if self._bar is not None:
            self._bar.write(line)
        else:
            print(line, flush=True)
        for name, value in scalars.items():
            self._tb.add_scalar(name, value, global_step=step)
        self._tb.flush()

    def write_text(self, line: str) -> None:
        """Prints an informational line (process 0 only)."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(line)
        else:
            print(line, flush=True)

    def advance(self, num_steps: int = 1) -> None:
        """Moves the progress bar forward."""
        if self._bar is not None:
            self._bar.update(num_steps)

    def close(self) -> None:
        """Flushes and closes the event file and the progress bar."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
