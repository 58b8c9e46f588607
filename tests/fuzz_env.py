"""Shared pieces of the fuzz-style robustness tests (``tests/test_fuzz_*.py``): :class:`Outcomes`
and its module-scoped ``outcomes`` fixture, the seed and :func:`npy`.

Each case goes through one reader or loader; the accepted outcomes are "read" (possibly with
samples skipped and counted by reason) or one of the documented clear errors: :class:`UserError`
or :class:`ValueError` with a non-empty message. Anything else (TypeError, KeyError,
RecursionError, a crash deep in PIL/numpy/safetensors, a hang) fails the test with the case named.
The outcome counts of each test file are printed (``pytest -s``).

A test file uses the fixture by importing it: ``from fuzz_env import outcomes``.
"""
from __future__ import annotations

import collections
import io
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

from mmcore.errors import UserError

SEED = 1234


class Outcomes:
    """Runs cases and counts what happened; unexpected exceptions are collected as failures."""

    def __init__(self) -> None:
        self.counts: collections.Counter[str] = collections.Counter()
        self.by_reader: collections.Counter[str] = collections.Counter()
        self.failures: list[str] = []
        self.ok_cases: list[str] = []

    def run(self, reader: str, name: str, fn: Callable[[], Any]) -> Any:
        self.by_reader[reader] += 1
        try:
            result = fn()
        except UnicodeDecodeError as err:  # a ValueError, but not a clear one: it does not name the file
            self.failures.append(f"{reader}/{name}: bare UnicodeDecodeError: {err}")
            return None
        except (UserError, ValueError) as err:
            message = str(err).strip()
            if not message:
                self.failures.append(f"{reader}/{name}: {type(err).__name__} without a message")
            if "Traceback" in message or "\n" in message.strip():
                self.failures.append(f"{reader}/{name}: multi-line message: {message[:300]!r}")
            self.counts[f"{reader}: {type(err).__name__}"] += 1
            return None
        except Exception as err:  # noqa: BLE001 -- exactly what the fuzz test looks for
            self.failures.append(f"{reader}/{name}: {type(err).__name__}: {str(err)[:300]}")
            return None
        self.counts[f"{reader}: ok"] += 1
        self.ok_cases.append(f"{reader}/{name}")
        return result

    @property
    def total(self) -> int:
        return sum(self.by_reader.values())

    def assert_clean(self) -> None:
        """Fail with the unexpected exceptions collected so far (and forget them)."""
        failures, self.failures = self.failures, []
        self.failed_total = getattr(self, "failed_total", 0) + len(failures)
        assert not failures, f"{len(failures)} unexpected exceptions:\n" + "\n".join(failures)


@pytest.fixture(scope="module")
def outcomes(request):
    out = Outcomes()
    yield out
    print(f"\nfuzz: {out.total} cases")
    for key, count in sorted(out.counts.items()):
        print(f"  {key:55s} {count}")


def npy(array) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=True)
    return buffer.getvalue()


def run_on_copy(outcomes: Outcomes, reader: str, name: str, source: Path, directory: Path,
                mutate: Callable[[Path], None], load: Callable[[Path], Any]) -> None:
    """Copy the export ``source`` to ``directory``, damage it with ``mutate``, load it with ``load``."""
    shutil.copytree(source, directory)
    mutate(directory)
    outcomes.run(reader, name, lambda: load(directory))
