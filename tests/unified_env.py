"""A tiny, fully local environment for unified-model tests: ShapesWorld shards, a sentencepiece
model, a random-weight QLIP tokenizer export (with its text tokenizer) and its precomputed codes."""
from pathlib import Path

import torch

from mmcore.text_tokenizer import train_sentencepiece
from tokenizer.export import load_tokenizer, save_tokenizer
from tokenizer.qlip import QLIP, preset_config
from unified_mm.data import shapesworld_cli
from unified_mm.tokenizer_cli import precompute

ROOT = Path(__file__).resolve().parents[1]
SMALL_QLIP = {"encoder": {"width": 32, "depth": 1, "heads": 2}, "decoder": {"width": 32, "depth": 1, "heads": 2},
              "text": {"width": 32, "depth": 1, "heads": 2}, "embed_dim": 32}


def make_unified_env(root: Path, train: int = 64, val: int = 24) -> dict[str, Path]:
    torch.manual_seed(0)
    data, export, codes = root / "data", root / "qlip", root / "codes"
    assert shapesworld_cli.main(["--config", str(ROOT / "configs/data/shapesworld_tiny.yaml"), "--out", str(data),
                                 "--quiet", f"splits.train={train}", f"splits.val={val}", "splits.test=8",
                                 "samples_per_shard=16"]) == 0
    texts = ["What colour is the object on the left?", "How many objects are there?", "a red circle",
             "a large blue square in the top left", "yes no 1 2 3 top bottom left right centre",
             "Describe the image.", "What is in this picture?", "Write a caption for this image.",
             "red green blue yellow purple cyan circle square triangle cross"] * 10
    text_model = train_sentencepiece(texts, root / "text.model", vocab_size=400)
    save_tokenizer(QLIP(preset_config("tiny", SMALL_QLIP)), export, text_tokenizer_path=text_model)
    precompute(load_tokenizer(export), data, ["train", "val"], codes, batch_size=32, progress=False)
    return {"root": root, "data": data, "tokenizer": export, "codes": codes, "text_model": text_model}
