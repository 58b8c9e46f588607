"""The stage-1 objective with a partial reconstruction (``recon_fraction``): which images the
reconstruction terms score, and the config's checks."""
import pytest
import torch

from mmcore.config import ConfigError
from tokenizer.losses import mse_loss, psnr
from tokenizer.qlip import build_qlip, preset_config
from train.tokenizer_config import LossWeights, TokenizerTrainConfig
from train.tokenizer_loss import stage1_loss_terms


def test_partial_reconstruction_scores_only_the_decoded_images():
    torch.manual_seed(0)
    model = build_qlip(preset_config("tiny", {"text": None})).eval()
    pixels = torch.rand(4, 3, 32, 32) * 2 - 1
    weights = LossWeights(recon=100.0, align=1.0, quantizer=1.0)
    with torch.no_grad():
        out = model(pixels, decode_count=2)
        total, terms = stage1_loss_terms(model, out, pixels, labels=[0, 1, 2, 3], weights=weights)
    assert out.reconstruction.shape[0] == 2
    assert torch.allclose(terms["recon"], mse_loss(out.reconstruction, pixels[:2]))
    assert torch.allclose(terms["psnr_db"], psnr(out.reconstruction, pixels[:2]))
    assert torch.allclose(total, 100.0 * terms["recon"] + out.bsq.loss)
    # the BSQ term still sees every image: it equals the full forward's
    with torch.no_grad():
        assert torch.allclose(out.bsq.loss, model(pixels).bsq.loss)


@pytest.mark.parametrize("fraction, batch, expected", [(1.0, 32, 32), (0.5, 32, 16), (0.25, 32, 8),
                                                       (0.5, 3, 2), (0.01, 8, 1)])
def test_recon_images_rounds_and_keeps_one(fraction, batch, expected):
    assert TokenizerTrainConfig(recon_fraction=fraction).recon_images(batch) == expected


@pytest.mark.parametrize("fraction", [0.0, -0.5, 1.5])
def test_recon_fraction_outside_unit_interval_is_an_error(fraction):
    with pytest.raises(ConfigError, match="recon_fraction"):
        TokenizerTrainConfig(recon_fraction=fraction).validate()


def test_freeze_codes_is_for_stage_2_only():
    with pytest.raises(ConfigError, match="freeze_codes=true .* stage 2 only"):
        TokenizerTrainConfig(freeze_codes=True).validate()
    TokenizerTrainConfig(stage=2, init_from="stage1/export", freeze_codes=True).validate()


def test_code_align_adds_a_clip_term_on_the_code_embeddings():
    """weights.code_align: total gains code_align x the CLIP loss of (code_embeds, text_embeds);
    0 leaves the objective as it was; the config refuses it without a code head in stage 1 (stage 2,
    which inherits stage 1's weights, has no text and leaves it unused, like align)."""
    torch.manual_seed(0)
    model = build_qlip(preset_config("tiny", {"code_head": True})).eval()
    pixels = torch.rand(4, 3, 32, 32) * 2 - 1
    ids = torch.randint(1, model.config.text.vocab_size, (4, 6))
    with torch.no_grad():
        out = model(pixels, ids, torch.ones_like(ids, dtype=torch.bool))
        base, terms = stage1_loss_terms(model, out, pixels, [0, 1, 2, 3], LossWeights(50.0, 1.0, 1.0))
        total, with_codes = stage1_loss_terms(model, out, pixels, [0, 1, 2, 3],
                                              LossWeights(50.0, 1.0, 1.0, code_align=0.5))
    assert "code_align" not in terms
    assert torch.allclose(total, base + 0.5 * with_codes["code_align"])
    swapped = out._replace(image_embeds=out.code_embeds)  # the [CLS] term computed on the codes' embeds
    with torch.no_grad():
        _, reference = stage1_loss_terms(model, swapped, pixels, [0, 1, 2, 3], LossWeights(50.0, 1.0, 1.0))
    assert torch.allclose(with_codes["code_align"], reference["align"])
    with pytest.raises(ConfigError, match="code_head"):
        TokenizerTrainConfig(weights=LossWeights(code_align=1.0)).validate()
    TokenizerTrainConfig(stage=2, init_from="x", weights=LossWeights(code_align=1.0)).validate()
    TokenizerTrainConfig(model={"code_head": True}, weights=LossWeights(code_align=1.0)).validate()
