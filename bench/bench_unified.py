"""Benchmark: unified-model training throughput (tokens/s) and model FLOP utilisation.

    python bench/bench_unified.py                       # CPU: tiny and base-100m, fp32
    python bench/bench_unified.py --device cuda --presets llama-3.2-1b --seq 2048 --batch 8

For each preset one run times full training steps (forward, modality-separated loss, backward,
AdamW) on random token ids, after warm-up steps, in the same process that measures the
device's matmul peak (fp32 2048² on CPU, bf16 8192² on CUDA), so MFU is against this machine's
measured ceiling, not a datasheet. FLOPs per token use the usual estimate
``6·N + 12·layers·seq·hidden`` (N: matmul parameters incl. the LM head, not the embedding
lookup; the second term is attention scores and values, forward + backward).
On CUDA the step runs under bf16 autocast with fp32 master weights (the usual mixed precision).
``--loss hidden`` computes the output layer only at labelled positions, as the trainer does under
ZeRO 0-2 (``train/unified.py: forward_losses``); on random ids every position is labelled, so it
measures that path's overhead, not its saving (FLOPs are counted the same either way).
Plain PyTorch, no DeepSpeed: this measures the model, not the data-parallel machinery.
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

from unified_mm.loss import modality_token_losses, modality_token_losses_from_hidden  # noqa: E402
from unified_mm.model import UnifiedModelConfig, build_model  # noqa: E402
from unified_mm.vocab import Vocab  # noqa: E402

VOCABS = {  # text+special ids, bits, group size, grid
    "shapesworld": (519, 12, 6, 8),
    "qlip-28bit": (32007, 28, 14, 16),
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(device: torch.device, repeats: int = 10) -> dict:
    """Measured dense matmul rate: fp32 2048² on CPU, bf16 8192² on CUDA (mean of timed runs)."""
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (2048, torch.float32)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    seconds = (time.perf_counter() - start) / repeats
    return {"n": n, "dtype": str(dtype).replace("torch.", ""), "tflops": 2 * n ** 3 / seconds / 1e12}


def matmul_params(model: torch.nn.Module) -> int:
    """Parameters used in matmuls: every Linear weight (incl. the LM head), not embeddings/norms."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def flops_per_token(model, seq: int) -> float:
    cfg = model.config
    return 6 * matmul_params(model) + 12 * cfg.num_hidden_layers * seq * cfg.hidden_size


def step_loss(model, ids: torch.Tensor, vocab: Vocab, autocast, loss_path: str) -> torch.Tensor:
    """One forward + modality-separated loss, through the full logits or the trainer's hidden path."""
    with autocast:
        if loss_path == "hidden":
            hidden = model.model(input_ids=ids).last_hidden_state
            return modality_token_losses_from_hidden(hidden, model.lm_head, ids, vocab).losses.mean()
        logits = model(input_ids=ids).logits
    return modality_token_losses(logits, ids, vocab).losses.mean()


def bench_preset(preset: str, vocab: Vocab, device: torch.device, seq: int, batch: int, steps: int,
                 warmup: int, checkpointing: bool, loss_path: str = "logits") -> dict:
    torch.manual_seed(0)
    model = build_model(UnifiedModelConfig(preset=preset, gradient_checkpointing=checkpointing), vocab).to(device)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    ids = torch.randint(0, vocab.size, (batch, seq), device=device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for index in range(warmup + steps):
        sync(device)
        start = time.perf_counter()
        loss = step_loss(model, ids, vocab, autocast, loss_path)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        if index >= warmup:
            times.append(time.perf_counter() - start)
    step_s = sum(times) / len(times)
    tokens_per_s = batch * seq / step_s
    row = {"preset": preset, "device": device.type, "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
           "matmul_params_m": matmul_params(model) / 1e6, "seq": seq, "batch": batch, "steps": steps,
           "step_s": step_s, "tokens_per_s": tokens_per_s,
           "achieved_tflops": tokens_per_s * flops_per_token(model, seq) / 1e12,
           "gradient_checkpointing": checkpointing, "loss": loss_path}
    if device.type == "cuda":
        row["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 1e9
    del model, optimizer
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="tiny,base-100m", help="comma-separated model presets")
    parser.add_argument("--vocab", default="", choices=["", *VOCABS], help="vocab layout (default: "
                        "shapesworld on CPU, qlip-28bit on CUDA)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--seq", type=int, default=256, help="tokens per sequence")
    parser.add_argument("--batch", type=int, default=8, help="sequences per step")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (after --warmup)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing")
    parser.add_argument("--loss", default="logits", choices=["logits", "hidden"],
                        help="logits: full (B, T, V) logits; hidden: output layer at labelled positions only")
    parser.add_argument("--out", default="", help="also write the results as JSON here")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            print("error: --device cuda but CUDA is not available", file=sys.stderr)
            return 2
        torch.backends.cuda.matmul.allow_tf32 = True
    vocab = Vocab.for_tokenizers(*VOCABS[args.vocab or ("qlip-28bit" if device.type == "cuda" else "shapesworld")])
    peak = matmul_peak(device)
    print(f"measured peak: {peak['tflops']:.3f} TFLOP/s ({peak['dtype']} {peak['n']}^2 matmul on {device.type}, "
          f"{torch.get_num_threads()} threads)", flush=True)
    rows = []
    for preset in [p for p in args.presets.split(",") if p]:
        row = bench_preset(preset, vocab, device, args.seq, args.batch, args.steps, args.warmup, args.checkpointing,
                           args.loss)
        row["mfu"] = row["achieved_tflops"] / peak["tflops"]
        rows.append(row)
        mem = f", peak mem {row['peak_mem_gb']:.1f} GB" if "peak_mem_gb" in row else ""
        print(f"{preset:>14}: {row['params_m']:.1f}M params, {row['tokens_per_s']:,.0f} tokens/s, "
              f"{row['step_s']:.3f} s/step (batch {args.batch} x {args.seq}), {row['achieved_tflops']:.3f} TFLOP/s, "
              f"MFU {row['mfu']:.1%}{mem}, loss path {args.loss}", flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"peak": peak, "vocab": vocab.to_dict(), "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
