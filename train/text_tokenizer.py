"""Train the sentencepiece text tokenizer on a shard set's text (captions, questions, answers).

    python -m train.text_tokenizer --config configs/text_tokenizer.yaml data=data/shapesworld \\
        out=runs/demo/text_tokenizer.model

The model is written atomically, with the resolved config next to it
(``<out>.config.yaml``) and a report of the vocabulary (``<out>.json``).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Iterator, Literal

from tqdm import tqdm

from mmcore.config import add_config_args, load_config, save_config
from mmcore.errors import UserError, cli_entry
from mmcore.io import atomic_write_json
from mmcore.text_tokenizer import SPECIALS, TextTokenizer, train_sentencepiece
from unified_mm.data.shards import ShardDataset, SkipLog, resolve_shards


@dataclasses.dataclass
class TextTokenizerConfig:
    data: str = "data/shapesworld"  # dataset directory (or shard pattern)
    split: str = "train"
    out: str = "runs/text_tokenizer.model"
    vocab_size: int = 512  # upper bound; a small corpus yields fewer pieces
    model_type: Literal["bpe", "unigram"] = "bpe"
    max_samples: int = 0  # 0 = every sample of the split


def sample_texts(meta: dict) -> Iterator[str]:
    """Every piece of text a sample carries: captions, questions and answers."""
    captions = meta.get("captions") or []
    if isinstance(meta.get("caption"), str):
        captions = [*captions, meta["caption"]]
    yield from (c for c in captions if isinstance(c, str))
    for qa in meta.get("qa") or []:
        if isinstance(qa, dict):
            yield from (qa[k] for k in ("question", "answer") if isinstance(qa.get(k), str))


def collect_corpus(cfg: TextTokenizerConfig) -> tuple[list[str], SkipLog]:
    skip_log = SkipLog()
    dataset = ShardDataset(resolve_shards(cfg.data, cfg.split), skip_log=skip_log)
    texts: list[str] = []
    for index, sample in enumerate(tqdm(dataset, desc="reading text", unit="sample")):
        if cfg.max_samples and index >= cfg.max_samples:
            break
        texts.extend(sample_texts(sample.meta))
    return texts, skip_log


@cli_entry
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    args = parser.parse_args(argv)
    cfg = load_config(TextTokenizerConfig, args.config, args.overrides)
    out = Path(cfg.out)
    if out.is_dir():
        raise UserError(f"out={out} is a directory; give the path of the .model file to write")

    texts, skip_log = collect_corpus(cfg)
    if not texts:
        raise UserError(f"no text found in split {cfg.split!r} of {cfg.data} (expected captions/qa in the json)")
    train_sentencepiece(texts, out, vocab_size=cfg.vocab_size, model_type=cfg.model_type)
    tokenizer = TextTokenizer(out)
    mean_len = sum(len(tokenizer.encode(t)) for t in texts[:2000]) / min(len(texts), 2000)
    report = {"model": str(out), "fingerprint": tokenizer.fingerprint, "texts": len(texts),
              "n_text": tokenizer.n_text, "specials": tokenizer.special_ids, "vocab_size": tokenizer.vocab_size,
              "mean_tokens_per_text": round(mean_len, 2), "skipped": skip_log.summary()}
    save_config(cfg, out.with_suffix(".config.yaml"))
    atomic_write_json(out.with_suffix(".json"), report)
    print(f"text tokenizer: {out} ({tokenizer.n_text} pieces + {len(SPECIALS)} specials, "
          f"{mean_len:.1f} tokens/text over {len(texts)} texts)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
