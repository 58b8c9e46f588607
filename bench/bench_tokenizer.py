"""Benchmark (not a test): QLIP encoder throughput vs a ViT-B/16 peer, and training step cost.

    python bench/bench_tokenizer.py [--quick] [--threads 2] [--only encoder|train] [--batch 8]

Numbers are only meaningful on an otherwise idle machine; the 1-minute load average at start is
printed and saved so a busy run can be recognised afterwards. Everything runs on the CPU in fp32.

**Encoder throughput** (image path only). Ours: the B-16-256 preset's ``ViTEncoder`` trunk plus
the ``ImageEmbeddingHead`` ([CLS] -> LayerNorm -> Linear -> L2), i.e. the modules behind
:meth:`QLIP.encode_image_embeds`, built on their own so the decoder and text tower are not
allocated. Peer: ``transformers.ViTModel`` (random init, ``attn_implementation="sdpa"``, no
pooler) from a ``ViTConfig`` of the same shape: hidden 768, 12 layers, 12 heads, intermediate
3072, image 256, patch 16. timm is not the peer because it imports torchvision, which fails to
import beside this torch build. Both see the same random (B, 3, 256, 256) batch under
``torch.inference_mode()``. After warm-up, timing runs in rounds; each round times ``iters``
forward passes of each model, alternating the order (A,B then B,A) to cancel drift. Reported:
median images/s over rounds per model, and the median over rounds of the per-round ratio
ours/peer. Our B/16 uses EVA-02 blocks (SwiGLU hidden int(8/3*768) = 2048, sub-LN, 2D RoPE), so
the forward GFLOPs per image are counted for each model with ``FlopCounterMode`` (batch 1, SDPA
forced onto its math backend so the attention matmuls are seen; FLOP = 2 x multiply-accumulate,
matmuls and convolutions only: LayerNorm, RoPE, softmax and activations are not counted), and
achieved GFLOP/s = GFLOP/image x images/s is reported alongside. A third row runs our trunk with
the peer's block (GELU MLP ratio 4, no sub-LN, no RoPE): the same computation as ViTModel, so its
ratio isolates the implementation from the EVA-02 features' extra elementwise work. Per-round
ratios on the 2-core machine scatter by about +-5%, hence 12 rounds: run to run, the median moved
between 0.92 and 1.00 for the same code. A profile of one batch-8 forward (torch.profiler, 2
threads) put ~70% of the time in the linear layers, ~9% in SDPA, and the rest in bias copies,
activations, LayerNorms and RoPE; the real-valued RoPE (6 passes per tensor) and the SwiGLU
out-of-place gate were the two items ours had on top of the peer's, now one complex multiply for q
and k together and an in-place gate when no gradient is recorded.

**Training step** per preset: ``tiny`` (batch 64, 32x32, text context 64) and ``B-16-256``
(batch 2, 256x256, text context 77). One step = full QLIP forward with text, the stage-1 loss
100 * MSE + CLIP + BSQ (the defaults of ``train.tokenizer_steps.LossWeights``), backward and a
``torch.optim.AdamW`` step, single process, plain PyTorch (no DeepSpeed). Random pixels and
token ids, full-length captions. Reported: median seconds per step over the timed steps after
warm-up (the first steps allocate the AdamW state), and the process's peak resident memory
(``VmHWM``; ``ru_maxrss`` where there is no /proc, see :func:`peak_rss_mb`). Each preset runs in
a fresh subprocess so peaks do not mix; the peak right after imports (before the model is built)
is reported too, so ``peak - after import`` is the model's and the step's share.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tokenizer.losses import clip_loss, mse_loss  # noqa: E402
from tokenizer.qlip import (ImageEmbeddingHead, build_qlip, count_parameters,  # noqa: E402
                            preset_config)
from tokenizer.vit import ViTEncoder  # noqa: E402

ENCODER_PRESET = "B-16-256"
LOSS_WEIGHTS = {"recon": 100.0, "align": 1.0, "quantizer": 1.0}  # LossWeights defaults, stage 1

# (full, quick) settings; quick is a smoke check only, its numbers mean nothing
ENCODER_SETTINGS = {"full": dict(warmup=2, rounds=12, iters=2),
                    "quick": dict(warmup=1, rounds=2, iters=1)}
TRAIN_SETTINGS = {  # preset -> mode -> batch / warm-up steps / timed steps
    "tiny": {"full": dict(batch=64, warmup=3, steps=10),
             "quick": dict(batch=16, warmup=1, steps=2)},
    "B-16-256": {"full": dict(batch=2, warmup=2, steps=5),
                 "quick": dict(batch=1, warmup=1, steps=2)},
}


# ---------------------------------------------------------------------------------------------
# Encoder throughput
# ---------------------------------------------------------------------------------------------

class QlipImageEncoder(nn.Module):
    """The image path of :class:`tokenizer.qlip.QLIP`: trunk + [CLS] embedding head."""

    def __init__(self, preset: str, encoder_overrides: dict | None = None):
        super().__init__()
        config = preset_config(preset, {"text": None, "encoder": encoder_overrides or {}})
        self.encoder = ViTEncoder(config.encoder)
        self.image_head = ImageEmbeddingHead(config.encoder.width, config.embed_dim,
                                             config.encoder.layer_norm_eps)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.image_head(self.encoder(pixels))


class HFViT(nn.Module):
    """``transformers.ViTModel`` of the same shape as our B/16 trunk, returning token states."""

    def __init__(self):
        super().__init__()
        from transformers import ViTConfig, ViTModel
        trunk = preset_config(ENCODER_PRESET).encoder
        config = ViTConfig(hidden_size=trunk.width, num_hidden_layers=trunk.depth,
                           num_attention_heads=trunk.heads, intermediate_size=4 * trunk.width,
                           image_size=trunk.image_size, patch_size=trunk.patch_size,
                           attn_implementation="sdpa")
        self.model = ViTModel(config, add_pooling_layer=False)
        if self.model.config._attn_implementation != "sdpa":
            raise RuntimeError(f"HF ViT uses {self.model.config._attn_implementation!r}, not sdpa")

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixels).last_hidden_state


class TimmViT(nn.Module):
    """``timm`` ViT-B/16 at our B/16 trunk's image size (random init, no head), when timm imports.

    timm needs torchvision, which does not import beside this project's pinned CPU torch wheel
    (ENV-NOTES), so this peer runs only where both are installed (e.g. the lent GPU machine's CPU).
    """

    def __init__(self):
        super().__init__()
        import timm
        trunk = preset_config(ENCODER_PRESET).encoder
        self.model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0,
                                       img_size=trunk.image_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(pixels)


# Our trunk with the peer's block (GELU MLP of ratio 4, no sub-LN, no RoPE): the same
# computation as ViTModel, so its ratio measures the implementation; the preset's ratio adds the
# cost of the EVA-02 features the released QLIP-B encoder has.
PLAIN_BLOCKS = {"swiglu": False, "sub_ln": False, "rope": False, "mlp_ratio": 4.0}


def timm_available() -> bool:
    try:
        import timm  # noqa: F401
        return True
    except Exception:  # ImportError, or torchvision failing against this torch
        return False


def forward_gflops(model: nn.Module, image_size: int) -> float:
    """Matmul + conv GFLOP of one forward pass on one image (SDPA on the math backend)."""
    pixels = torch.zeros(1, 3, image_size, image_size)
    with torch.inference_mode(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        model(pixels)
    return fc.get_total_flops() / 1e9


def time_forward(model: nn.Module, pixels: torch.Tensor, iters: int) -> float:
    """Images per second over ``iters`` back-to-back forward passes."""
    with torch.inference_mode():
        start = time.perf_counter()
        for _ in range(iters):
            model(pixels)
        elapsed = time.perf_counter() - start
    return pixels.shape[0] * iters / elapsed


def interleaved_rates(models: dict[str, nn.Module], pixels: torch.Tensor, warmup: int,
                      rounds: int, iters: int) -> dict[str, list[float]]:
    """Per-round images/s of each model; the order of the models flips every round."""
    names = list(models)
    for name in names:
        time_forward(models[name], pixels, warmup)
    rates: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            rates[name].append(time_forward(models[name], pixels, iters))
    return rates


def bench_encoder(batch: int, warmup: int, rounds: int, iters: int) -> dict:
    torch.manual_seed(0)
    models = {"ours": QlipImageEncoder(ENCODER_PRESET).eval(),
              "ours_plain": QlipImageEncoder(ENCODER_PRESET, PLAIN_BLOCKS).eval(),
              "hf_vit": HFViT().eval()}
    if timm_available():
        models["timm_vit"] = TimmViT().eval()
    image_size = preset_config(ENCODER_PRESET).encoder.image_size
    pixels = torch.rand(batch, 3, image_size, image_size) * 2 - 1
    rates = interleaved_rates(models, pixels, warmup, rounds, iters)
    result = {"preset": ENCODER_PRESET, "batch": batch, "warmup": warmup, "rounds": rounds,
              "iters_per_round": iters, "models": {}}
    for name, model in models.items():
        gflops = forward_gflops(model, image_size)
        images_per_s = statistics.median(rates[name])
        result["models"][name] = {
            "params": sum(p.numel() for p in model.parameters()), "gflop_per_image": gflops,
            "images_per_s": images_per_s, "gflop_per_s": gflops * images_per_s,
            "round_images_per_s": rates[name]}
    result["ratio_ours_over_hf"] = statistics.median(
        a / b for a, b in zip(rates["ours"], rates["hf_vit"]))
    result["ratio_ours_plain_over_hf"] = statistics.median(
        a / b for a, b in zip(rates["ours_plain"], rates["hf_vit"]))
    if "timm_vit" in rates:
        result["ratio_ours_over_timm"] = statistics.median(
            a / b for a, b in zip(rates["ours"], rates["timm_vit"]))
    result["threads"] = torch.get_num_threads()
    return result


def print_encoder(result: dict) -> None:
    labels = {"ours": f"QLIP {result['preset']} image encoder",
              "ours_plain": "  same, plain ViT blocks",
              "hf_vit": "transformers ViTModel (sdpa)", "timm_vit": "timm vit_base_patch16 (256 px)"}
    print(f"\nEncoder forward throughput: batch {result['batch']}, fp32, inference_mode, "
          f"{result['rounds']} interleaved rounds x {result['iters_per_round']} iters")
    print(f"{'model':34}{'params':>12}{'GFLOP/img':>11}{'images/s':>10}{'GFLOP/s':>10}")
    for name, row in result["models"].items():
        print(f"{labels[name]:34}{row['params']:>12,}{row['gflop_per_image']:>11.2f}"
              f"{row['images_per_s']:>10.2f}{row['gflop_per_s']:>10.1f}")
    print(f"ratio ours / HF (median of per-round ratios): {result['ratio_ours_over_hf']:.3f}; "
          f"plain blocks / HF: {result['ratio_ours_plain_over_hf']:.3f}")
    if "ratio_ours_over_timm" in result:
        print(f"ratio ours / timm (median of per-round ratios): {result['ratio_ours_over_timm']:.3f}")
    else:
        print("timm: not importable here (needs a torchvision matching this torch); skipped")


# ---------------------------------------------------------------------------------------------
# Training step (one subprocess per preset)
# ---------------------------------------------------------------------------------------------

def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB.

    Linux: ``VmHWM`` from /proc/self/status. Not ``ru_maxrss``: Linux carries ``ru_maxrss`` over
    ``execve``, so a worker spawned by this (large) parent would start at the parent's peak.
    Elsewhere: ``ru_maxrss`` (bytes on macOS, KiB otherwise).
    """
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # "VmHWM:  123456 kB"
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def make_train_step(preset: str, batch: int) -> tuple[Callable[[], float], int, dict]:
    """A closure running one full stage-1 optimisation step; plus parameter count and shapes."""
    torch.manual_seed(0)
    model = build_qlip(preset).train()
    config = model.config
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    size, context = config.encoder.image_size, config.text.context_length
    pixels = torch.rand(batch, 3, size, size) * 2 - 1
    text_ids = torch.randint(0, config.text.vocab_size, (batch, context))
    mask = torch.ones(batch, context, dtype=torch.int64)

    def step() -> float:
        out = model(pixels, text_ids, mask)
        clip = clip_loss(out.image_embeds, out.text_embeds, model.logit_scale,
                         max_logit_scale=config.max_logit_scale)
        loss = (LOSS_WEIGHTS["recon"] * mse_loss(out.reconstruction, pixels)
                + LOSS_WEIGHTS["align"] * clip.loss + LOSS_WEIGHTS["quantizer"] * out.bsq.loss)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    shapes = {"image_size": size, "text_context": context}
    return step, count_parameters(model)["total"], shapes


def train_worker(preset: str, batch: int, warmup: int, steps: int) -> dict:
    """Runs inside the subprocess: build, warm up, time ``steps`` steps, read the RSS peak."""
    baseline = peak_rss_mb()
    step, params, shapes = make_train_step(preset, batch)
    for _ in range(warmup):
        step()
    times, loss = [], float("nan")
    for _ in range(steps):
        start = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return {"preset": preset, "batch": batch, **shapes, "params": params, "warmup": warmup,
            "steps": steps, "step_s_median": median, "step_times_s": times,
            "images_per_s": batch / median, "last_loss": loss,
            "rss_after_import_mb": baseline, "peak_rss_mb": peak_rss_mb()}


def run_train_subprocess(preset: str, settings: dict, threads: int) -> dict:
    """One fresh interpreter per preset; its last stdout line is the JSON result."""
    spec = json.dumps({"preset": preset, **settings})
    cmd = [sys.executable, str(Path(__file__).resolve()), "--threads", str(threads),
           "--train-worker", spec]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"train worker for {preset} failed ({proc.returncode}):\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def print_train(rows: list[dict]) -> None:
    print("\nTraining step (stage-1: 100*MSE + CLIP + BSQ, AdamW), fp32, one process per row")
    print(f"{'preset':10}{'params':>13}{'batch':>6}{'image':>6}{'text':>5}{'s/step':>9}"
          f"{'images/s':>10}{'peak RSS MB':>13}{'after import':>14}")
    for r in rows:
        print(f"{r['preset']:10}{r['params']:>13,}{r['batch']:>6}{r['image_size']:>6}"
              f"{r['text_context']:>5}{r['step_s_median']:>9.3f}{r['images_per_s']:>10.2f}"
              f"{r['peak_rss_mb']:>13.0f}{r['rss_after_import_mb']:>14.0f}")
    print("s/step: median over timed steps after warm-up; peak RSS: VmHWM of the process")


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="few iterations and small batches: a smoke check, not a measurement")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--only", choices=["encoder", "train"], help="run one section only")
    parser.add_argument("--batch", type=int, help="encoder batch size (default 8; --quick: 2)")
    parser.add_argument("--out", type=Path, help="JSON output (default runs/bench/tokenizer.json; "
                        "--quick: runs/bench/tokenizer_quick.json)")
    parser.add_argument("--train-worker", help=argparse.SUPPRESS)  # internal: subprocess mode
    args = parser.parse_args(argv)
    if args.threads < 1 or (args.batch is not None and args.batch < 1):
        parser.error("--threads and --batch must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.train_worker:
        print(json.dumps(train_worker(**json.loads(args.train_worker))))
        return 0
    mode = "quick" if args.quick else "full"
    import transformers
    report = {"torch": torch.__version__, "transformers": transformers.__version__,
              "threads": args.threads, "quick": args.quick, "cpu_count": os.cpu_count(),
              "loadavg_1min_at_start": os.getloadavg()[0]}
    print("QLIP tokenizer benchmark"
          + (" (QUICK SMOKE RUN: numbers are not measurements)" if args.quick else ""))
    print(f"torch {report['torch']}, transformers {report['transformers']}, threads "
          f"{args.threads}, {report['cpu_count']} CPUs, 1-min load average at start "
          f"{report['loadavg_1min_at_start']:.2f} (numbers need an idle machine)")
    if args.only in (None, "encoder"):
        batch = args.batch or (2 if args.quick else 8)
        report["encoder"] = bench_encoder(batch, **ENCODER_SETTINGS[mode])
        print_encoder(report["encoder"])
    if args.only in (None, "train"):
        report["train"] = [run_train_subprocess(preset, per_mode[mode], args.threads)
                           for preset, per_mode in TRAIN_SETTINGS.items()]
        print_train(report["train"])
    default_name = "tokenizer_quick.json" if args.quick else "tokenizer.json"
    out = args.out or ROOT / "runs" / "bench" / default_name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
