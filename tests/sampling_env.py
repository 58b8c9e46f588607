"""A tiny real export directory for sampling and chat tests: sentencepiece text ids, a random QLIP
tokenizer on a 4x4 grid (12 bits = 2 groups of 6: 32 image ids per image) and a random 2-layer,
hidden-32 Llama, written by ``unified_mm.export.save_unified``."""
from pathlib import Path

import torch

from mmcore.text_tokenizer import TextTokenizer, train_sentencepiece
from tokenizer.export import save_tokenizer
from tokenizer.qlip import QLIP, preset_config
from unified_mm.export import save_unified
from unified_mm.model import UnifiedModelConfig, build_model
from unified_mm.vocab import Vocab

QLIP_SMALL = {"encoder": {"width": 32, "depth": 1, "heads": 2, "patch_size": 8},
              "decoder": {"width": 32, "depth": 1, "heads": 2, "patch_size": 8},
              "text": {"width": 32, "depth": 1, "heads": 2}, "embed_dim": 32}
# initializer_range 0.2 (not 0.02): a random model with peaked logits, so greedy/argmax
# comparisons are not decided by near-ties.
LLAMA_SMALL = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
               "intermediate_size": 64, "max_position_embeddings": 96, "initializer_range": 0.2}
CORPUS = ["a red circle", "a blue square in the top left", "what colour is the circle?", "red",
          "how many shapes are there?", "two", "draw a green triangle", "yes", "no"] * 20


def make_export(root: Path, sampler_defaults: dict | None = None, image_positions: bool = False,
                image_group_size: int = 0) -> Path:
    """Build and export the tiny model under ``root``; returns the export directory.
    ``image_positions``: with row/column/group embeddings at image ids (image_positions.py);
    ``image_group_size`` 12: one image id of all 12 bits per patch (the vocabulary regroups)."""
    torch.manual_seed(0)
    text_path = train_sentencepiece(CORPUS, root / "text.model", vocab_size=300)
    text = TextTokenizer(text_path)
    qlip = save_tokenizer(QLIP(preset_config("tiny", QLIP_SMALL)), root / "qlip", text_tokenizer_path=text_path)
    vocab = Vocab.for_tokenizers(text.vocab_size, 12, 6, 4, image_group_size=image_group_size)
    model = build_model(UnifiedModelConfig(overrides=LLAMA_SMALL, image_positions=image_positions), vocab,
                        text_pieces=text.n_text).eval()
    return save_unified(model, vocab, root / "export", text_tokenizer_path=text_path, tokenizer_dir=qlip,
                        sampler_defaults=sampler_defaults or {"cfg_scale": 3.0, "max_new_tokens": 8})
