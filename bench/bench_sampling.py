"""Benchmark: our text-to-image sampler vs ``transformers`` ``generate()`` on the same exported model.

    python bench/bench_sampling.py                                  # CPU: tiny and small presets
    python bench/bench_sampling.py --presets small --batches 1,8 --out runs/bench/sampling.json
    python bench/bench_sampling.py --model EXPORT_DIR               # an existing export
    python bench/bench_sampling.py --device cuda --presets base-100m --qlip-grid 16 --qlip-bits 28,14

One run, side by side, same exported model (random weights, built and exported with
``save_unified`` into a temporary directory unless ``--model`` is given), same prompts, same
settings (CFG scale, temperature, top-k):

* **ours**: ``unified_mm.sampling.sample_images`` (one batched forward over conditional and
  unconditional rows, shared unconditional prefix, LM head on the group's range only);
* **generate()**: ``model.generate(do_sample=True, guidance_scale=s, negative_prompt_ids=...)``
  (transformers' CFG runs the unconditional branch as a second forward per step) with a
  ``LogitsProcessor`` for the structural constraint (the step's group range, then ``<eoi>``).

Reported per batch size: images/s of each and the speed-up; a greedy agreement check (both
samplers at argmax: the fraction of equal image ids, to show the baseline does the same work);
and ours' decode rate (image tokens/s) against the memory-bandwidth bound of one decode step:
bytes read per step = non-embedding weights + the LM head's group slice + the KV cache of all
rows at the mean context length, with this machine's bandwidth measured in the same run by a
large tensor copy (read + write bytes / s).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from transformers import LogitsProcessor, LogitsProcessorList  # noqa: E402

from mmcore.text_tokenizer import train_sentencepiece  # noqa: E402
from tokenizer.export import save_tokenizer  # noqa: E402
from tokenizer.qlip import QLIP, preset_config  # noqa: E402
from unified_mm.export import load_unified, save_unified  # noqa: E402
from unified_mm.generate import left_pad  # noqa: E402
from unified_mm.model import UnifiedModelConfig, build_model  # noqa: E402
from unified_mm.sampling import SamplerSettings, sample_images  # noqa: E402
from unified_mm.sequence import SequenceBuilder  # noqa: E402
from unified_mm.vocab import Vocab  # noqa: E402

PROMPTS = ["a red circle", "a large blue square in the top left", "two green triangles",
           "a small yellow cross at the bottom right of the image"]
CORPUS = PROMPTS + ["what colour is the circle?", "how many shapes are there?", "red green blue yellow purple",
                    "circle square triangle cross top bottom left right centre large small"]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def memory_bandwidth(device: torch.device, megabytes: int, repeats: int = 10) -> float:
    """Bytes/s of a large tensor copy (each copy reads and writes ``megabytes``)."""
    src = torch.ones(megabytes * 2 ** 20 // 4, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        sync(device)
        times.append(time.perf_counter() - start)
    return 2 * src.numel() * 4 / min(times)


def build_export(out: Path, preset: str, grid: int, bits: int, group: int) -> Path:
    """A random-weight unified model + random QLIP tokenizer exported like training does."""
    torch.manual_seed(0)
    text_path = train_sentencepiece(CORPUS * 20, out / "text.model", vocab_size=300)
    from mmcore.text_tokenizer import TextTokenizer
    text = TextTokenizer(text_path)
    small = {"width": 32, "depth": 1, "heads": 2, "patch_size": 4, "image_size": 4 * grid}
    qlip_cfg = preset_config("tiny", {"encoder": small, "decoder": small, "embed_dim": 32,
                                      "text": {"width": 32, "depth": 1, "heads": 2},
                                      "bsq": {"num_bits": bits, "group_size": group,
                                              "entropy_mode": "analytical" if group > 10 else "group"}})
    qlip = save_tokenizer(QLIP(qlip_cfg), out / "qlip", text_tokenizer_path=text_path)
    vocab = Vocab.for_tokenizers(text.vocab_size, bits, group, grid)
    model = build_model(UnifiedModelConfig(preset=preset), vocab, text_pieces=text.n_text).eval()
    return save_unified(model, vocab, out / f"export-{preset}", text_tokenizer_path=text_path, tokenizer_dir=qlip)


class SpanConstraint(LogitsProcessor):
    """generate()'s structural constraint: new token t < N·G from group span_group(t), then <eoi>."""

    def __init__(self, vocab: Vocab, prompt_width: int, eoi_id: int, device: torch.device):
        self.prompt_width, self.length = prompt_width, vocab.tokens_per_image
        masks = [vocab.allowed_mask(k, device) for k in range(vocab.num_groups)]
        eoi = torch.zeros(vocab.size, dtype=torch.bool, device=device)
        eoi[eoi_id] = True
        self.masks = torch.stack([*masks, eoi])  # (G + 1, V)
        self.vocab = vocab

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        step = input_ids.shape[1] - self.prompt_width
        row = self.vocab.span_group(step) if step < self.length else self.vocab.num_groups
        return scores.masked_fill(~self.masks[row], float("-inf"))


def run_generate(loaded, builder, prompts: list[str], settings: SamplerSettings, greedy: bool) -> torch.Tensor:
    """transformers generate() with CFG as a second pass; returns the image ids (B, N·G)."""
    model, vocab, tok = loaded.model, loaded.vocab, loaded.text_tokenizer
    device = next(model.parameters()).device
    ids, mask = left_pad([builder.generation_prompt(p) for p in prompts], tok.pad_id)
    uncond = torch.tensor([builder.generation_prompt("")] * len(prompts), device=device)
    processor = SpanConstraint(vocab, ids.shape[1], tok.eoi_id, device)
    sampling = {} if greedy else {"temperature": settings.temperature, "top_k": settings.top_k,
                                  "top_p": settings.top_p}
    out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=not greedy,
                         max_new_tokens=vocab.tokens_per_image + 1, guidance_scale=settings.cfg_scale,
                         negative_prompt_ids=uncond, logits_processor=LogitsProcessorList([processor]),
                         pad_token_id=tok.pad_id, eos_token_id=tok.eos_id, **sampling)
    return out[:, ids.shape[1]: ids.shape[1] + vocab.tokens_per_image]


def run_ours(loaded, builder, prompts: list[str], settings: SamplerSettings) -> torch.Tensor:
    samples = sample_images(loaded.model, loaded.vocab, builder, prompts, 1, settings, batch_size=len(prompts))
    return torch.tensor([s.ids[:-1] for s in samples])


class PairTimes(NamedTuple):
    first_s: float
    second_s: float


def timed_pair(first, second, device: torch.device, repeats: int) -> PairTimes:
    """Median seconds of each function over ``repeats`` alternating calls (after one warm-up call
    each): on a shared machine, load changes hit both sides alike instead of one of them."""
    first(), second()
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for fn, out in ((first, times[0]), (second, times[1])):
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            out.append(time.perf_counter() - start)
    return PairTimes(statistics.median(times[0]), statistics.median(times[1]))


def step_bytes(model, vocab: Vocab, rows: int, prompt_len: float) -> float:
    """Bytes one decode step of ours must read: weights it touches + the KV cache of every row."""
    cfg = model.config
    element = next(model.parameters()).element_size()
    body = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n and "lm_head" not in n)
    head = vocab.group_vocab * cfg.hidden_size
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    mean_context = prompt_len + vocab.tokens_per_image / 2
    cache = 2 * cfg.num_hidden_layers * rows * cfg.num_key_value_heads * head_dim * mean_context
    return (body + head + cache) * element


def bench_batch(loaded, builder, batch: int, settings: SamplerSettings, repeats: int, bandwidth: float) -> dict:
    device = next(loaded.model.parameters()).device
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
    ours_s, hf_s = timed_pair(lambda: run_ours(loaded, builder, prompts, settings),
                              lambda: run_generate(loaded, builder, prompts, settings, greedy=False), device, repeats)
    greedy = SamplerSettings(temperature=0, cfg_scale=settings.cfg_scale)
    agree = (run_ours(loaded, builder, prompts, greedy).to(device)
             == run_generate(loaded, builder, prompts, greedy, greedy=True)).float().mean().item()
    vocab = loaded.vocab
    rows = batch * (2 if settings.cfg_scale != 1 else 1)
    prompt_len = statistics.mean(len(builder.generation_prompt(p)) for p in prompts)
    bound_steps = bandwidth / step_bytes(loaded.model, vocab, rows, prompt_len)
    tokens = batch * vocab.tokens_per_image
    return {"batch": batch, "rows_per_forward": rows, "ours_s": ours_s, "generate_s": hf_s,
            "ours_images_per_s": batch / ours_s, "generate_images_per_s": batch / hf_s, "speedup": hf_s / ours_s,
            "greedy_agreement": agree, "ours_tokens_per_s": tokens / ours_s,
            "bandwidth_bound_tokens_per_s": bound_steps * batch,
            "fraction_of_bound": tokens / ours_s / (bound_steps * batch)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="an existing export directory (default: build random ones)")
    parser.add_argument("--presets", default="tiny,small", help="model presets to build (without --model)")
    parser.add_argument("--qlip-grid", type=int, default=8, help="token grid side of the built tokenizer")
    parser.add_argument("--qlip-bits", default="12,6", help="bits,group_size of the built tokenizer")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--cfg-scale", type=float, default=3.0)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="", choices=["", "float32", "bfloat16"], help="default: fp32 CPU, bf16 CUDA")
    parser.add_argument("--bandwidth-mb", type=int, default=0, help="copy size (default 256 CPU, 2048 CUDA)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's)")
    parser.add_argument("--out", default="runs/bench/sampling.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    bandwidth = memory_bandwidth(device, args.bandwidth_mb or (2048 if device.type == "cuda" else 256))
    settings = SamplerSettings(temperature=args.temperature, top_k=args.top_k, cfg_scale=args.cfg_scale)
    print(f"{device.type}, {torch.get_num_threads()} threads, {dtype}; memory bandwidth (copy) "
          f"{bandwidth / 1e9:.1f} GB/s; cfg {settings.cfg_scale:g}, temperature {settings.temperature:g}", flush=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        bits, group = (int(x) for x in args.qlip_bits.split(","))
        exports = [Path(args.model)] if args.model else [
            build_export(Path(tmp), p, args.qlip_grid, bits, group) for p in args.presets.split(",") if p]
        for export in exports:
            loaded = load_unified(export, device=device, dtype=dtype)
            builder = SequenceBuilder(loaded.text_tokenizer, loaded.vocab, loaded.model.config.max_position_embeddings)
            params = sum(p.numel() for p in loaded.model.parameters())
            print(f"\n{export.name}: {params / 1e6:.1f}M params, vocab {loaded.vocab.size}, "
                  f"{loaded.vocab.tokens_per_image} image ids per image", flush=True)
            print(f"{'batch':>5} {'ours img/s':>11} {'generate img/s':>15} {'speed-up':>9} {'greedy agree':>13} "
                  f"{'ours tok/s':>11} {'bw bound tok/s':>15} {'of bound':>9}")
            for batch in (int(b) for b in args.batches.split(",")):
                row = bench_batch(loaded, builder, batch, settings, args.repeats, bandwidth)
                row.update(model=export.name, params_m=params / 1e6, vocab_size=loaded.vocab.size)
                results.append(row)
                print(f"{batch:>5} {row['ours_images_per_s']:>11.2f} {row['generate_images_per_s']:>15.2f} "
                      f"{row['speedup']:>8.2f}x {row['greedy_agreement']:>12.1%} {row['ours_tokens_per_s']:>11.0f} "
                      f"{row['bandwidth_bound_tokens_per_s']:>15.0f} {row['fraction_of_bound']:>9.1%}", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": device.type, "threads": torch.get_num_threads(), "dtype": str(dtype),
                               "bandwidth_bytes_per_s": bandwidth, "settings": settings.to_dict(),
                               "rows": results}, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
