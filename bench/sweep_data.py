"""Data for ``bench/tokenizer_sweep.py``: ShapesWorld and the text tokenizer built where missing,
and a background-thread prefetch of the training batches."""
from __future__ import annotations

import queue
import threading
from pathlib import Path

from mmcore.config import config_to_dict, load_config
from mmcore.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
DATA_CONFIG = "configs/data/shapesworld.yaml"
TEXT_TOKENIZER_CONFIG = "configs/text_tokenizer.yaml"


def ensure_data(data: Path, text_tokenizer: Path, data_overrides: list[str]) -> None:
    """Build ShapesWorld and the text tokenizer with the project's CLIs where they are missing."""
    from unified_mm.data import shapesworld_cli
    from unified_mm.data.shapesworld import ShapesWorldConfig
    from unified_mm.tokenizer_eval import data_config
    from train import text_tokenizer as text_tokenizer_cli

    wanted = load_config(ShapesWorldConfig, ROOT / DATA_CONFIG, data_overrides)
    if (data / "manifest.json").is_file():
        if config_to_dict(data_config(data)) != config_to_dict(wanted):
            raise UserError(f"--data {data} holds a dataset built with other settings than "
                            f"{DATA_CONFIG} + --data-overrides {data_overrides}; delete it or pass another --data")
        print(f"data: reusing {data}", flush=True)
    else:
        print(f"data: generating ShapesWorld into {data} ({DATA_CONFIG} {' '.join(data_overrides)})", flush=True)
        rc = shapesworld_cli.main(["--config", str(ROOT / DATA_CONFIG), "--out", str(data), "--overwrite",
                                   "--quiet", *data_overrides])
        if rc:
            raise UserError(f"ShapesWorld generation failed (exit {rc})")
    if text_tokenizer.is_file():
        print(f"text tokenizer: reusing {text_tokenizer}", flush=True)
        return
    rc = text_tokenizer_cli.main(["--config", str(ROOT / TEXT_TOKENIZER_CONFIG), f"data={data}",
                                  f"out={text_tokenizer}"])
    if rc:
        raise UserError(f"text tokenizer training failed (exit {rc})")


class Prefetch:
    """Runs a batch iterator in a background thread (PNG decoding overlaps the training step)."""

    def __init__(self, iterator, depth: int = 4):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, args=(iterator,), daemon=True)
        self._thread.start()

    def _fill(self, iterator) -> None:
        try:
            for item in iterator:
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.2)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
            self._queue.put(StopIteration())
        except BaseException as err:  # noqa: BLE001  (handed to the consumer)
            self._queue.put(err)

    def __next__(self):
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
