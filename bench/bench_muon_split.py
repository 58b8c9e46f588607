"""Muon's step with the Newton-Schulz work split across data-parallel ranks, against every rank
doing all of it (train.optim.Muon ``split``), on a unified preset's decoder matrices.

Run under torchrun (one process per rank; on a CPU each gets its share of the cores):

    torchrun --nproc_per_node 2 bench/bench_muon_split.py                 # tiny preset, float32
    torchrun --nproc_per_node 2 bench/bench_muon_split.py --preset small --repeats 3

Gradients are random (the step's cost does not depend on them); each setting is timed over
``--steps`` steps after 3 warm-up steps, ``--repeats`` times in alternation (this machine's speed
drifts between runs), and rank 0 prints ms per step. A benchmark, not a test: the exactness of
the split is tests/test_muon_split.py.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from train.distributed import init_distributed  # noqa: E402
from train.optim import OptimConfig, SplitRanks, build_optimizer  # noqa: E402
from unified_mm.model import UnifiedModelConfig, build_model  # noqa: E402
from unified_mm.vocab import Vocab  # noqa: E402

SHAPESWORLD_VOCAB = (519, 12, 6, 3)  # text+special ids, bits, group size, grid (the demo's cell codes)


def time_steps(model: torch.nn.Module, cfg: OptimConfig, split: SplitRanks | None, steps: int) -> float:
    """Seconds per Muon+AdamW step, the same on every rank (a barrier before and after)."""
    optimizer = build_optimizer(model, cfg, split=split)
    for param in model.parameters():
        param.grad = torch.randn_like(param)
    for _ in range(3):
        optimizer.step()
    dist.barrier()
    start = time.perf_counter()
    for _ in range(steps):
        optimizer.step()
    dist.barrier()
    return (time.perf_counter() - start) / steps


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", help="unified model preset (default tiny)")
    parser.add_argument("--ns-dtype", default="float32", choices=["float32", "bfloat16"],
                        help="Newton-Schulz precision (default float32, the demo's on CPUs without AMX)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per setting (default 10)")
    parser.add_argument("--repeats", type=int, default=2, help="alternations of the two settings (default 2)")
    parser.add_argument("--out", default="", help="append a JSON row here (rank 0)")
    args = parser.parse_args()
    info = init_distributed()
    if info.world_size < 2:
        raise SystemExit("run under torchrun with --nproc_per_node >= 2: one rank has nothing to split")
    model = build_model(UnifiedModelConfig(preset=args.preset), Vocab.for_tokenizers(*SHAPESWORLD_VOCAB))
    cfg = OptimConfig(lr=1e-3, name="muon", muon_params=("model.layers.*",), muon_ns_dtype=args.ns_dtype)
    split = SplitRanks(info.rank, info.world_size, dist.all_reduce)
    whole, shared = [], []
    for _ in range(args.repeats):
        whole.append(time_steps(model, cfg, None, args.steps))
        shared.append(time_steps(model, cfg, split, args.steps))
    if info.rank == 0:
        matrices = sum(1 for name, p in model.named_parameters() if p.ndim == 2 and name.startswith("model.layers."))
        row = {"preset": args.preset, "ranks": info.world_size, "threads_per_rank": torch.get_num_threads(),
               "ns_dtype": args.ns_dtype, "muon_matrices": matrices,
               "whole_ms": [round(1e3 * s, 1) for s in whole], "split_ms": [round(1e3 * s, 1) for s in shared]}
        print(f"{args.preset}: {matrices} Muon matrices, {info.world_size} ranks x {row['threads_per_rank']} "
              f"thread(s): every rank all of them {row['whole_ms']} ms/step, split {row['split_ms']} ms/step")
        if args.out:
            with open(args.out, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(row) + "\n")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
