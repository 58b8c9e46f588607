"""The unified decoder: a stock ``transformers.LlamaForCausalLM`` over the unified vocabulary.

Two ways to get one (:func:`build_model`):

* **from a preset** (:data:`PRESETS`, one row of ``LlamaConfig`` fields per size, plus
  ``overrides``): a fresh, randomly initialised Llama whose ``vocab_size`` is ``vocab.size``;
* **from a local HF Llama directory** (``pretrained``: ``config.json`` + safetensors, never
  downloaded): loaded strictly, then its embedding (and untied ``lm_head``) extended from the
  text model's rows to ``vocab.size``.

Why extending works without moving any row: our id layout (``mmcore.text_tokenizer``,
``unified_mm.vocab``) is ``[sentencepiece pieces][our specials][image ids]``: specials are appended
*after* the pieces, never mapped onto the model's own ``<s>``/``</s>``, so every text row of the
pretrained model keeps its id and its weights bit for bit. The new rows (7 specials + G·2^g image
ids) start at the mean of the existing rows (DESIGN.md §3). The model's own ``<s>``/``</s>`` rows
are kept but unused by our templates; the config's ``pad/bos/eos_token_id`` (and the generation
config's) are set to our specials.

With ``image_positions`` the input embedding becomes an
:class:`unified_mm.image_positions.ImagePositionEmbedding` (the same token rows plus row/column/group
embeddings at image ids); the model class and everything else stay stock.

The model is plain single-device code: no DeepSpeed, no training loop. It is built on the CPU in
float32; callers move it (``model.to(device, dtype)``).
"""
from __future__ import annotations

import copy
import difflib
import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import SafetensorError
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.utils import is_flash_attn_2_available

from mmcore.config import ConfigError
from mmcore.errors import UserError
from mmcore.io import read_json
from mmcore.text_tokenizer import SPECIALS
from unified_mm.image_positions import install_image_positions
from unified_mm.vocab import Vocab

__all__ = [
    "UnifiedModelConfig", "PRESETS", "ATTENTION_CHOICES", "build_model", "preset_llama_config",
    "count_parameters", "resolve_attention", "special_token_ids", "scale_query_key_init",
]

# ---------------------------------------------------------------------------------------------
# Presets: one table, rows of LlamaConfig fields (vocab_size and the special ids come from the Vocab)
# ---------------------------------------------------------------------------------------------

def _row(hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int, max_positions: int,
         rope_theta: float, tie: bool, rms_norm_eps: float = 1e-5) -> dict[str, Any]:
    return {
        "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "intermediate_size": intermediate,  # head_dim = hidden / heads
        "max_position_embeddings": max_positions,
        "rope_parameters": {"rope_type": "default", "rope_theta": float(rope_theta)},
        "rms_norm_eps": rms_norm_eps, "tie_word_embeddings": tie, "hidden_act": "silu",
        "initializer_range": 0.02, "attention_bias": False, "mlp_bias": False,
    }


PRESETS: dict[str, dict[str, Any]] = {
    # CPU demo size (ShapesWorld: 128 image ids per image, ~150-token sequences).
    "tiny": _row(128, 4, 4, 4, 512, 512, 10_000, tie=False),
    # ~14M non-embedding parameters (4x MLP); a few hours of CPU, minutes of GPU.
    "small": _row(384, 6, 6, 6, 1536, 1024, 10_000, tie=False),
    # ~85M non-embedding parameters; the size for a real single-GPU run on ShapesWorld-like data.
    "base-100m": _row(768, 12, 12, 12, 2048, 2048, 10_000, tie=False),
    # The Llama-3.2-1B shape (to train from scratch or to match a local checkpoint). The original
    # uses max_position_embeddings 131072 with llama3 rope scaling; we keep plain rope with
    # rope_theta 500000 at 4096 positions (a 256x256 image is 512 ids; 4096 is plenty).
    "llama-3.2-1b": _row(2048, 16, 32, 8, 8192, 4096, 500_000, tie=True),
}

ATTENTION_CHOICES = ("auto", "sdpa", "eager", "flash_attention_2")
IMAGE_INIT_CHOICES = ("default", "bits")

# Fields the vocabulary decides; an override of them would break the id layout.
_VOCAB_FIELDS = ("vocab_size", "pad_token_id", "bos_token_id", "eos_token_id")
# Every LlamaConfig constructor field (LlamaConfig itself silently accepts unknown kwargs).
_LLAMA_FIELDS = frozenset(
    name for name, p in inspect.signature(LlamaConfig.__init__).parameters.items()
    if name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
)
# Convenience alias: ``rope_theta`` updates ``rope_parameters["rope_theta"]``.
_OVERRIDE_FIELDS = (_LLAMA_FIELDS | {"rope_theta"}) - set(_VOCAB_FIELDS)


@dataclass
class UnifiedModelConfig:
    preset: str = "tiny"  # a row of PRESETS (ignored for the shape when `pretrained` is set)
    pretrained: Optional[str] = None  # local HF Llama directory (config.json + safetensors)
    attn_implementation: str = "auto"  # auto | sdpa | eager | flash_attention_2
    gradient_checkpointing: bool = False
    overrides: dict = field(default_factory=dict)  # LlamaConfig fields over the preset row / pretrained config
    # How the image ids' embedding and output rows start: "default" (the preset's random init, or
    # the mean row when extending a pretrained model) or "bits" (a fixed random linear map of the
    # code's ±1 bits, see init_image_rows_from_bits). Only the start differs; loading ignores it.
    image_embedding_init: str = "default"
    # With "bits": the share of each image row's variance kept from its own random (default)
    # init, the rest from the bits map: sqrt(1-r)·bits map + sqrt(r)·random row (see
    # init_image_rows_from_bits). Tried for shape questions (session 18): 0.5 did not help.
    image_embedding_random: float = 0.0
    # Learned row + column + group embeddings added to image ids' inputs
    # (unified_mm/image_positions.py); saved in config.json, so loading rebuilds them.
    image_positions: bool = False
    # Bits per image id (unified_mm/vocab.py): 0 = the tokenizer's group size (tiny: 2 ids of
    # 6 bits per patch); the tokenizer's num_bits = one id per patch (tiny: 1 of 4,096).
    image_group_size: int = 0
    # Query and key projections of every layer start this many times the preset's init (fresh
    # models only). An attention logit is bilinear in W_q and W_k, so how fast a step moves it
    # grows with the other's size; from the default N(0, 0.02) the decoder learned to tell the
    # object a question names from the others very slowly (session 20, bench/lookup_probe.py).
    # 4 helped a 1,000-step bench (+2.8 VQA points over 2 seeds) but not the demo's budget
    # (configs/unified/tiny.yaml keeps 1). Only the start differs; loading ignores it.
    attention_init_scale: float = 1.0

    def validate(self) -> None:
        if not self.attention_init_scale > 0:
            raise ConfigError(f"model.attention_init_scale must be > 0, got {self.attention_init_scale}")
        if self.attention_init_scale != 1.0 and self.pretrained is not None:
            raise ConfigError("model.attention_init_scale rescales a fresh model's query/key weights; "
                              f"it would corrupt the pretrained weights of {self.pretrained} (set it to 1)")
        if self.image_group_size < 0:
            raise ConfigError(f"model.image_group_size must be >= 0 (0: the tokenizer's), got {self.image_group_size}")
        if self.preset not in PRESETS:
            raise ConfigError(f"unknown model preset {self.preset!r}; known: {', '.join(PRESETS)}")
        if self.attn_implementation not in ATTENTION_CHOICES:
            raise ConfigError(f"model.attn_implementation {self.attn_implementation!r} is not one of "
                              f"{', '.join(ATTENTION_CHOICES)}")
        _check_overrides(self.overrides)
        if self.image_embedding_init not in IMAGE_INIT_CHOICES:
            raise ConfigError(f"model.image_embedding_init {self.image_embedding_init!r} is not one of "
                              f"{', '.join(IMAGE_INIT_CHOICES)}")
        if not 0.0 <= self.image_embedding_random < 1.0:
            raise ConfigError(f"model.image_embedding_random must be in [0, 1), got {self.image_embedding_random}")
        if self.image_embedding_random and self.image_embedding_init != "bits":
            raise ConfigError("model.image_embedding_random mixes random rows into the bits map: it needs "
                              f"image_embedding_init: bits, got {self.image_embedding_init!r}")


def _check_overrides(overrides: dict) -> None:
    if not isinstance(overrides, dict):
        raise ConfigError(f"model.overrides must be a mapping of LlamaConfig fields, got {overrides!r}")
    for key in overrides:
        if key in _VOCAB_FIELDS:
            raise ConfigError(f"model.overrides.{key}: set from the unified vocabulary, not overridable")
        if key not in _OVERRIDE_FIELDS:
            close = difflib.get_close_matches(str(key), sorted(_OVERRIDE_FIELDS), n=3, cutoff=0.5)
            hint = ("; did you mean " + " or ".join(repr(c) for c in close) + "?") if close else \
                "; see transformers.LlamaConfig for the accepted fields"
            raise ConfigError(f"unknown LlamaConfig field {key!r} in model.overrides{hint}")


def _apply_overrides(fields: dict[str, Any], overrides: dict) -> dict[str, Any]:
    """``fields`` (plain LlamaConfig kwargs) updated by ``overrides`` (``rope_theta`` is folded into
    ``rope_parameters``); returns a new dict."""
    _check_overrides(overrides)
    merged = copy.deepcopy(fields)
    for key, value in copy.deepcopy(overrides).items():
        if key == "rope_theta":
            rope = dict(merged.get("rope_parameters") or {"rope_type": "default"})
            rope["rope_theta"] = float(value)
            merged["rope_parameters"] = rope
        else:
            merged[key] = value
    return merged


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------

def special_token_ids(vocab: Vocab) -> dict[str, int]:
    """Unified ids of our specials (they sit right after the sentencepiece pieces)."""
    n_text = vocab.text_vocab_size - len(SPECIALS)
    if n_text <= 0:
        raise UserError(f"vocab: text_vocab_size {vocab.text_vocab_size} leaves no room for the "
                        f"{len(SPECIALS)} specials after the sentencepiece pieces")
    return {name: n_text + i for i, name in enumerate(SPECIALS)}


def _vocab_fields(vocab: Vocab) -> dict[str, int]:
    ids = special_token_ids(vocab)
    return {"vocab_size": vocab.size, "pad_token_id": ids["<pad>"], "bos_token_id": ids["<bos>"],
            "eos_token_id": ids["<eos>"]}


def resolve_attention(requested: str, device: str | torch.device | None = None) -> str:
    """The attention implementation to build with.

    ``auto``: ``flash_attention_2`` when flash-attn is installed and ``device`` is CUDA, else
    ``sdpa``. ``device`` None means "cuda if available, else cpu". An explicit
    ``flash_attention_2`` without flash-attn or without CUDA is an error (it would fail later).
    """
    if requested not in ATTENTION_CHOICES:
        raise UserError(f"attn_implementation {requested!r} is not one of {', '.join(ATTENTION_CHOICES)}")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    on_cuda = torch.device(device).type == "cuda"
    if requested == "auto":
        return "flash_attention_2" if on_cuda and is_flash_attn_2_available() else "sdpa"
    if requested == "flash_attention_2":
        if not is_flash_attn_2_available():
            raise UserError("attn_implementation 'flash_attention_2' needs the flash-attn package "
                            "(pip install -e .[flash]); use auto, sdpa or eager")
        if not on_cuda:
            raise UserError(f"attn_implementation 'flash_attention_2' needs a CUDA device, got {device}; "
                            "use auto, sdpa or eager")
    return requested


def preset_llama_config(name: str, vocab: Vocab, overrides: dict | None = None) -> LlamaConfig:
    """A fresh ``LlamaConfig`` for preset ``name`` (+ overrides) sized for ``vocab``."""
    if name not in PRESETS:
        raise UserError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}")
    fields = _apply_overrides(PRESETS[name], overrides or {})
    return LlamaConfig(**fields, **_vocab_fields(vocab))


def count_parameters(model: torch.nn.Module) -> dict[str, int]:
    """``total`` (unique parameters: a tied lm_head counts once), ``embedding`` (input embedding +
    untied lm_head) and ``non_embedding``. Works on meta tensors."""
    total = sum(p.numel() for p in model.parameters())
    embed = model.get_input_embeddings().weight
    embedding = embed.numel()
    output = model.get_output_embeddings()
    if output is not None and output.weight is not embed:
        embedding += output.weight.numel()
    return {"total": total, "embedding": embedding, "non_embedding": total - embedding}


# ---------------------------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------------------------

def build_model(cfg: UnifiedModelConfig, vocab: Vocab, text_pieces: int | None = None,
                device: str | torch.device | None = None) -> LlamaForCausalLM:
    """A ``LlamaForCausalLM`` with ``vocab.size`` embedding rows (float32, on the CPU, train mode).

    ``text_pieces``: the sentencepiece piece count of the text tokenizer (``TextTokenizer.n_text``);
    it must agree with ``vocab`` and, with ``cfg.pretrained``, with the checkpoint's embedding rows.
    ``device``: where the model will run, only to resolve ``attn_implementation: auto``.
    """
    cfg.validate()
    n_text = vocab.text_vocab_size - len(SPECIALS)
    special_token_ids(vocab)  # vocab leaves room for the specials
    if text_pieces is not None and text_pieces != n_text:
        raise UserError(f"text tokenizer has {text_pieces} pieces, but vocab.text_vocab_size "
                        f"{vocab.text_vocab_size} implies {n_text} pieces + {len(SPECIALS)} specials")
    attn = resolve_attention(cfg.attn_implementation, device)
    if cfg.pretrained is None:
        config = preset_llama_config(cfg.preset, vocab, cfg.overrides)
        model = LlamaForCausalLM._from_config(copy.deepcopy(config), attn_implementation=attn,
                                              dtype=torch.float32)
    else:
        model = _load_pretrained(Path(cfg.pretrained), cfg.overrides, n_text, attn)
        extend_vocabulary(model, vocab)
    if cfg.attention_init_scale != 1.0:
        scale_query_key_init(model, cfg.attention_init_scale)
    if cfg.image_embedding_init == "bits":
        init_image_rows_from_bits(model, vocab, random_share=cfg.image_embedding_random)
    if cfg.image_positions:
        install_image_positions(model, vocab, special_token_ids(vocab)["<boi>"])
    if cfg.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


@torch.no_grad()
def scale_query_key_init(model: LlamaForCausalLM, scale: float) -> None:
    """Multiply every layer's query and key projection weights by ``scale`` (see
    ``UnifiedModelConfig.attention_init_scale``)."""
    for layer in model.model.layers:
        layer.self_attn.q_proj.weight.mul_(scale)
        layer.self_attn.k_proj.weight.mul_(scale)


def _read_pretrained_config(path: Path, overrides: dict) -> LlamaConfig:
    if not path.is_dir():
        raise UserError(f"pretrained model directory not found: {path}")
    config_path = path / "config.json"
    if not config_path.is_file():
        raise UserError(f"{path} is not a HF model directory: missing config.json")
    raw = read_json(config_path)
    if not isinstance(raw, dict) or raw.get("model_type") != "llama":
        found = raw.get("model_type") if isinstance(raw, dict) else type(raw).__name__
        raise UserError(f"{config_path}: model_type is {found!r}, expected 'llama' "
                        "(the unified decoder is a stock LlamaForCausalLM)")
    try:
        config = LlamaConfig.from_dict(raw)
        if overrides:
            # to_dict() is the current format (rope_parameters, no legacy rope_scaling)
            config = LlamaConfig.from_dict(_apply_overrides(config.to_dict(), overrides))
    except (TypeError, ValueError, KeyError) as err:
        raise UserError(f"{config_path}: not a valid Llama config: {err}") from None
    return config


def _load_pretrained(path: Path, overrides: dict, n_text: int, attn: str) -> LlamaForCausalLM:
    """Load a local HF Llama strictly (safetensors only, never downloads)."""
    config = _read_pretrained_config(path, overrides)
    if config.vocab_size != n_text:
        raise UserError(f"{path / 'config.json'}: vocab_size {config.vocab_size} != {n_text} pieces of "
                        "the text tokenizer; use the sentencepiece tokenizer.model that ships with "
                        "this model")
    if not ((path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file()):
        raise UserError(f"{path}: missing model.safetensors (or model.safetensors.index.json); only "
                        "safetensors checkpoints are loaded")
    try:
        model, info = LlamaForCausalLM.from_pretrained(
            path, config=copy.deepcopy(config), local_files_only=True, use_safetensors=True,
            output_loading_info=True, dtype=torch.float32, attn_implementation=attn)
    except SafetensorError as err:  # corrupt header / truncated file
        raise UserError(f"{path}: corrupt or unreadable safetensors file: {err}") from None
    except (OSError, RuntimeError, ValueError) as err:  # e.g. a shape mismatch (first line is enough)
        raise UserError(f"{path}: cannot load the checkpoint: {str(err).strip().splitlines()[0]}") from None
    problems = []
    for label, key in (("missing", "missing_keys"), ("unexpected", "unexpected_keys"),
                       ("with the wrong shape", "mismatched_keys")):
        keys = sorted(str(k if isinstance(k, str) else k[0]) for k in info.get(key) or ())
        if keys:
            problems.append(f"{len(keys)} {label} (e.g. {', '.join(keys[:3])})")
    if info.get("error_msgs"):
        problems.append("; ".join(str(m) for m in info["error_msgs"][:2]))
    if problems:
        raise UserError(f"{path} does not match its config.json: " + "; ".join(problems))
    rows = model.get_input_embeddings().weight.shape[0]
    if rows != n_text:
        raise UserError(f"{path}: embedding has {rows} rows, but the text tokenizer has {n_text} pieces")
    return model


@torch.no_grad()
def extend_vocabulary(model: LlamaForCausalLM, vocab: Vocab) -> LlamaForCausalLM:
    """Grow a text Llama's embedding (and untied lm_head) to ``vocab.size`` rows in place.

    Old rows stay bit-identical; every new row is exactly the float32 mean of the old rows of its
    matrix (DESIGN.md §3). HF's ``mean_resizing=True`` samples from N(mean, 1e-9·Σ) instead (not
    exactly the mean, and it draws from the global RNG), so the rows are set here. Tied weights stay
    tied. The config's (and generation config's) pad/bos/eos become our specials.
    """
    embed = model.get_input_embeddings()
    old = embed.weight.shape[0]
    if old > vocab.size:
        raise UserError(f"model has {old} embedding rows, more than the unified vocabulary ({vocab.size})")
    output = model.get_output_embeddings()
    tied = output is not None and output.weight is embed.weight
    embed_mean = embed.weight.float().mean(0)
    out_mean = None if tied or output is None else output.weight.float().mean(0)
    out_bias_mean = None if tied or output is None or output.bias is None else output.bias.float().mean()
    model.resize_token_embeddings(vocab.size, mean_resizing=False)
    embed = model.get_input_embeddings()
    embed.weight[old:] = embed_mean.to(embed.weight.dtype)
    if out_mean is not None:
        output = model.get_output_embeddings()
        output.weight[old:] = out_mean.to(output.weight.dtype)
        if out_bias_mean is not None:
            output.bias[old:] = out_bias_mean.to(output.bias.dtype)
    for target in (model.config, model.generation_config):
        for key, value in _vocab_fields(vocab).items():
            if key != "vocab_size" or target is model.config:
                setattr(target, key, value)
    return model


@torch.no_grad()
def init_image_rows_from_bits(model: LlamaForCausalLM, vocab: Vocab, seed: int = 0,
                              random_share: float = 0.0) -> LlamaForCausalLM:
    """Set the image ids' input (and untied output) rows to a random linear map of their bits.

    Row of group k, code c: ``R_k · s(c) · std / sqrt(g)`` with ``s(c)`` the code's g bits as ±1
    (MSB first, :meth:`Vocab.code_bits`), ``R_k`` a fixed N(0, 1) matrix (hidden × g) per group and
    ``std`` the config's ``initializer_range``, so each element has the default init's scale. Codes
    that share bits start with similar embeddings, and the output logit of a code starts as a sum
    of per-bit terms: the model need not discover the codebook's structure from scratch. A private
    generator (``seed``) keeps the global RNG stream untouched.

    ``random_share`` r > 0 keeps part of each row's current (random) values: the row becomes
    ``sqrt(1 - r) · bits map + sqrt(r) · row``, the same scale, so each id also has a direction of
    its own. The idea (session 18): a read-out pooling rows linear in the bits is linear in the
    bits, and on one-object ShapesWorld images a linear probe names the shape from the mean ±1
    bits 47% of the time, from the bag of ids 85%. Measured, r = 0.5 did not help shape questions
    (configs/unified/tiny.yaml); colour, also poorly linear in the mean bits, is learned fast anyway.
    """
    generator = torch.Generator().manual_seed(seed)
    std = float(model.config.initializer_range)
    signs = vocab.code_bits(torch.arange(vocab.group_vocab)).float() * 2 - 1  # (2^g, g) in ±1
    embed = model.get_input_embeddings().weight
    output = model.get_output_embeddings()
    matrices = [embed] if output is None or output.weight is embed else [embed, output.weight]
    for weight in matrices:
        hidden = weight.shape[1]
        for group in range(vocab.num_groups):
            start, stop = vocab.group_range(group)
            projection = torch.randn(hidden, vocab.group_size, generator=generator)  # (hidden, g)
            rows = signs @ projection.T * (std / vocab.group_size ** 0.5)  # (2^g, hidden)
            if random_share:
                rows = (1 - random_share) ** 0.5 * rows + random_share ** 0.5 * weight[start:stop].float()
            weight[start:stop] = rows.to(weight.dtype)
    return model


# ---------------------------------------------------------------------------------------------

def _print_counts() -> None:
    """Parameter counts of every preset for the ShapesWorld tiny vocab and the QLIP 28-bit vocab."""
    vocabs = {"shapesworld(519+2x64)": Vocab(519, 2, 6, 8), "qlip-28bit(32007+2x16384)": Vocab(32_007, 2, 14, 16)}
    print(f"{'preset':14}{'vocab':28}{'total':>16}{'embedding':>16}{'non_embedding':>16}")
    for name in PRESETS:
        for label, vocab in vocabs.items():
            with torch.device("meta"):
                model = LlamaForCausalLM._from_config(preset_llama_config(name, vocab))
            c = count_parameters(model)
            print(f"{name:14}{label:28}{c['total']:>16,}{c['embedding']:>16,}{c['non_embedding']:>16,}")


if __name__ == "__main__":
    _print_counts()
