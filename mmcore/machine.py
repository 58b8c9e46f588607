"""What machine a run happened on: CPU model, core count, AMX-BF16, GPU.

Training here runs for wall-clock budgets (the demo's tokenizer and unified steps), so the same
command reaches different step counts and scores on different CPUs: session 21's machine (Skylake-SP,
no AMX) fitted 40-47% of the steps the same demo budgets fitted on the machine of sessions 16-20
(README, Status). Reports print this beside their figures so two runs can be compared.
"""
from __future__ import annotations

import os
import platform

CPUINFO = "/proc/cpuinfo"


def _cpuinfo_lines() -> list[str]:
    try:
        with open(CPUINFO, encoding="utf-8", errors="replace") as handle:
            return handle.readlines()
    except OSError:  # not Linux, or no /proc
        return []


def cpu_has_amx_bf16() -> bool:
    """Whether this CPU advertises AMX-BF16 (Linux /proc/cpuinfo flags; False elsewhere)."""
    return any(line.startswith("flags") and "amx_bf16" in line.split() for line in _cpuinfo_lines())


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo's ``model name``, else ``platform.processor()``), or
    "unknown CPU"."""
    for line in _cpuinfo_lines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and value.strip():
            return " ".join(value.split())
    return platform.processor() or "unknown CPU"


def describe(gpu_name: str | None = None) -> dict:
    """A JSON-ready description: cpu, cpus (logical, as the OS reports), amx_bf16, gpu (when given)."""
    facts = {"cpu": cpu_model(), "cpus": os.cpu_count() or 1, "amx_bf16": cpu_has_amx_bf16()}
    if gpu_name:
        facts["gpu"] = gpu_name
    return facts


def describe_text(facts: dict) -> str:
    """One line for a report, e.g. ``Intel(R) Xeon(R) Processor @ 2.00GHz, 2 CPUs, no AMX-BF16``."""
    parts = [str(facts.get("cpu", "unknown CPU")), f"{facts.get('cpus', '?')} CPUs",
             "AMX-BF16" if facts.get("amx_bf16") else "no AMX-BF16"]
    if facts.get("gpu"):
        parts.append(f"GPU {facts['gpu']}")
    return ", ".join(parts)
