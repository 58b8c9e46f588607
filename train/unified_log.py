"""Run logging for training entry points: JSONL records plus TensorBoard event files.

Only rank 0 writes (``enabled``). On resume, JSONL records after the checkpoint's step are
dropped (they are redone) and TensorBoard's ``purge_step`` hides the interrupted run's events
from that step on, so both logs read like one uninterrupted run. tensorboardX writes the event
files without TensorFlow or the tensorboard server package.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from tensorboardX import SummaryWriter

from train.tokenizer import truncate_log

LOG_NAME = "train_log.jsonl"
TB_DIR = "tensorboard"


class RunLogger:
    def __init__(self, out_dir: str | Path, *, enabled: bool, resume_step: int = 0):
        self.enabled = enabled
        self.path = Path(out_dir) / LOG_NAME
        self.writer = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if resume_step:
                truncate_log(self.path, resume_step)
            elif self.path.exists():
                self.path.unlink()  # a fresh run starts a fresh log
            self.writer = SummaryWriter(str(Path(out_dir) / TB_DIR),
                                        purge_step=resume_step if resume_step else None)

    def log(self, step: int, record: dict) -> None:
        if not self.enabled:
            return
        clean = {key: (None if isinstance(v, float) and not math.isfinite(v) else v) for key, v in record.items()}
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"step": step, **clean}) + "\n")
        for key, value in record.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
