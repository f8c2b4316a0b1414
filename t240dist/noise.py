"""What t240dist silences of its stack's output, each line with the reason; the one place that does.

Only lines that tell a user nothing true about their run, or that t240dist answers better, and each by
its message (or, for a library's chatty internals, by its logger's level), so that anything else the
stack says still reaches the user. Imports nothing heavy: entry points call ``silence`` before composing.
"""

from __future__ import annotations

import logging
import re
import warnings

# (logger, message pattern): log lines dropped where they are emitted.
_LOG_LINES = (
    # an advertisement for a cloud service, printed by every Trainer that has no LitLogger
    ("pytorch_lightning.utilities.rank_zero", r"💡 Tip: For seamless cloud logging"),
    # conf/ gives every limit as 1.0 ("all batches"); Lightning says so for each limit that is given at all
    (
        "pytorch_lightning.utilities.rank_zero",
        r"`Trainer\(limit_(train|val|test|predict)_batches=1\.0\)` was configured so 100%",
    ),
    # t240dist's one-line model summary (callbacks.ModelSize) stands in for Lightning's default table
    ("pytorch_lightning.utilities.rank_zero", r"Trainer already configured with model summary callbacks"),
)
# Loggers whose INFO lines are a library's internals: the ONNX exporter's optimizer reports each of its
# passes (11 lines an export); export reports what matters, the check against PyTorch (max_abs_diff).
_QUIET_LOGGERS = ("onnxscript", "onnx_ir")
# (message pattern, category, module that warns): warnings ignored; "" matches any module.
_WARNINGS = (
    # Lightning 2.6's copy of torch's pytree builds the deprecated LeafSpec itself; nothing a user can change
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning, ""),
    # under overfit_batches ImageDataModule's training order is not shuffled; Lightning still says it turns
    # shuffling off, because that sampler is not a SequentialSampler (and puts one in its place)
    (r"You requested to overfit but enabled train dataloader shuffling", Warning, ""),
    # Heartbeats and reruns of stale trials are "experimental" in optuna, and meant for Study.optimize, which
    # a sweeper that asks and tells does not use: what the sweeper itself calls is nothing a user can act on
    # (a sampler or pruner the user picks still says so)
    (r".* is experimental \(supported from v", Warning, r"hydra_plugins\.t240dist_optuna"),
    (r"Argument ``heartbeat_\w+`` is an experimental feature", Warning, ""),
    (r"Heartbeat of storage is supposed to be used with Study.optimize", Warning, ""),
    # a mid-epoch resume: Lightning says a plain DataLoader cannot resume where it stopped; ExactResume
    # makes t240dist's loaders do so, so the warning would contradict what t240dist guarantees
    (r"You're resuming from a checkpoint that ended before the epoch ended", Warning, ""),
    # a checkpoint folder that is not empty: a run writes into one only to resume it (resume=never refuses
    # such a folder), so the warning says nothing true
    (r"Checkpoint directory .* exists and is not empty", Warning, ""),
    # Lightning's CSV writer deletes an existing metrics.csv: a resumed run has moved it aside and writes
    # its rows back (loggers.ContinuedCSVLogger), so nothing is lost
    (r"Experiment logs directory .* exists and is not empty", Warning, ""),
)


def silence() -> None:
    """Install the filters above in this process (again: no effect)."""
    for logger, pattern in _LOG_LINES:
        target = logging.getLogger(logger)
        if not any(isinstance(f, _DropLines) and f.pattern.pattern == pattern for f in target.filters):
            target.addFilter(_DropLines(pattern))
    for logger in _QUIET_LOGGERS:
        logging.getLogger(logger).setLevel(logging.WARNING)
    for pattern, category, module in _WARNINGS:
        warnings.filterwarnings("ignore", message=pattern, category=category, module=module)


class _DropLines(logging.Filter):
    """Drops the records whose message matches ``pattern``."""

    def __init__(self, pattern: str) -> None:
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())
