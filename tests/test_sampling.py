"""Text-to-image sampling: KV cache vs full forwards, CFG, temperature, top-k/top-p, the structural
constraint, per-sample seeds, and the sampling CLI (outputs and one-line errors)."""
import json
import shutil

import pytest
import torch
from PIL import Image

from mmcore.errors import UserError
from sampling_env import make_export
from unified_mm import sample_cli
from unified_mm.export import load_unified
from unified_mm.generate import advance, concat_states, head_logits, prefill, select_rows
from unified_mm.sampling import SamplerSettings, draw, filter_logits, make_generators, sample_images
from unified_mm.sequence import SequenceBuilder

PROMPTS = ["a red circle", "draw a green triangle in the top left", "red", "a blue square"]


@pytest.fixture(scope="module", params=[(False, 0), (True, 0), (True, 12)],
                ids=["plain", "image_positions", "one_id_per_patch"])
def env(request, tmp_path_factory):
    """A model without, and one with, image position embeddings: the second must see the same
    place for an image id whether it comes from a full forward or from the KV-cached decoder.
    The third writes one id of 4,096 per patch, which the vocabulary regroups into the
    tokenizer's two 6-bit codes."""
    root = tmp_path_factory.mktemp("sampling")
    image_positions, image_group_size = request.param
    export = make_export(root, image_positions=image_positions, image_group_size=image_group_size)
    loaded = load_unified(export)
    builder = SequenceBuilder(loaded.text_tokenizer, loaded.vocab, loaded.model.config.max_position_embeddings)
    return {"root": root, "export": export, "loaded": loaded, "builder": builder}


def run(env, prompts=PROMPTS[:2], n=2, batch_size=8, seeds=None, **settings):
    loaded = env["loaded"]
    return sample_images(loaded.model, loaded.vocab, env["builder"], prompts, n, SamplerSettings(**settings),
                         seeds=seeds, batch_size=batch_size)


def full_logits(model, ids):
    """Last-position logits (V,) of one unpadded sequence, no cache."""
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0, -1]


# ---------------------------------------------------------------------------------------------
# KV cache
# ---------------------------------------------------------------------------------------------

def test_kv_cached_decoding_matches_full_forwards(env):
    """Left-padded prompts of different lengths + a copied unconditional prefix, decoded 6 steps."""
    loaded, builder = env["loaded"], env["builder"]
    model, pad = loaded.model, loaded.text_tokenizer.pad_id
    prompts = [builder.generation_prompt(p) for p in PROMPTS[:3]]
    uncond_prompt = builder.generation_prompt("")
    assert len({len(p) for p in prompts}) == 3
    with torch.inference_mode():
        uncond = prefill(model, [uncond_prompt], pad)
        state = concat_states(model, [prefill(model, prompts, pad), select_rows(model, uncond, torch.zeros(3).long())])
        rows = [*prompts, uncond_prompt, uncond_prompt, uncond_prompt]
        generator = torch.Generator().manual_seed(0)
        for _ in range(6):
            cached = head_logits(model, state.hidden)  # (6, V)
            for row, seq in enumerate(rows):
                torch.testing.assert_close(cached[row], full_logits(model, seq), atol=1e-5, rtol=0)
            new = torch.randint(loaded.vocab.image_start, loaded.vocab.size, (6, 1), generator=generator)
            rows = [seq + [int(new[i])] for i, seq in enumerate(rows)]
            state = advance(model, state, new)


def reference_images(env, prompt, seeds, settings):
    """Independent reference: full forwards (no cache), one image at a time, guided on the group
    slice, the same per-seed noise (draw)."""
    loaded, builder = env["loaded"], env["builder"]
    vocab, model = loaded.vocab, loaded.model
    out = []
    for seed in seeds:
        generator = make_generators([seed], torch.device("cpu"))
        cond, uncond = builder.generation_prompt(prompt), builder.generation_prompt("")
        ids = []
        for t in range(vocab.tokens_per_image):
            start, end = vocab.group_range(vocab.span_group(t))
            logits = full_logits(model, cond + ids)[start:end]
            if settings.cfg_scale != 1:
                u = full_logits(model, uncond + ids)[start:end]
                logits = u + settings.cfg_scale * (logits - u)
            ids.append(start + int(draw(logits[None], settings, generator)))
        out.append(ids + [loaded.text_tokenizer.eoi_id])
    return out


@pytest.mark.parametrize("cfg_scale,temperature", [(3.0, 0.0), (3.0, 1.0), (1.0, 1.0)])
def test_sampler_matches_uncached_reference(env, cfg_scale, temperature):
    settings = SamplerSettings(temperature=temperature, cfg_scale=cfg_scale, top_k=20)
    samples = run(env, prompts=PROMPTS[:2], n=2, cfg_scale=cfg_scale, temperature=temperature, top_k=20)
    for i, prompt in enumerate(PROMPTS[:2]):
        expected = reference_images(env, prompt, [s.seed for s in samples[2 * i: 2 * i + 2]], settings)
        assert [s.ids for s in samples[2 * i: 2 * i + 2]] == expected


# ---------------------------------------------------------------------------------------------
# CFG, temperature, filtering
# ---------------------------------------------------------------------------------------------

def test_cfg_scale_one_is_conditional_sampling_without_unconditional_rows(env):
    """Scale 1 equals conditional-only sampling (uncached reference, same seeds) and runs no
    unconditional row: one prefill of the one distinct prompt, then forwards of 3 rows (3 images)."""
    batch_rows = []
    hook = env["loaded"].model.model.register_forward_pre_hook(
        lambda module, args, kwargs: batch_rows.append(
            (kwargs["input_ids"] if kwargs.get("input_ids") is not None else kwargs["inputs_embeds"]).shape[0]),
        with_kwargs=True)
    try:
        samples = run(env, prompts=PROMPTS[:1], n=3, cfg_scale=1.0, temperature=1.0)
    finally:
        hook.remove()
    assert batch_rows == [1] + [3] * (env["loaded"].vocab.tokens_per_image - 1)
    expected = reference_images(env, PROMPTS[0], [s.seed for s in samples], SamplerSettings(cfg_scale=1.0))
    assert [s.ids for s in samples] == expected
    guided = run(env, prompts=PROMPTS[:1], n=3, cfg_scale=3.0, temperature=1.0)
    assert [s.ids for s in guided] != [s.ids for s in samples]  # guidance changes the images


def test_temperature_to_zero_is_argmax(env):
    logits = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    generators = make_generators(range(16), torch.device("cpu"))
    for temperature in (1e-3, 1e-6):
        picked = draw(logits, SamplerSettings(temperature=temperature), generators)
        assert torch.equal(picked, logits.argmax(-1))
    assert torch.equal(draw(logits, SamplerSettings(temperature=0), generators), logits.argmax(-1))
    cold = run(env, temperature=1e-4, seeds=[5, 6, 7, 8])
    greedy = run(env, temperature=0.0, seeds=[1, 2, 3, 4])  # argmax ignores the seeds
    assert [s.ids for s in cold] == [s.ids for s in greedy]


def test_filter_logits_keeps_exactly_the_hand_computed_sets():
    probs = torch.tensor([0.10, 0.40, 0.05, 0.30, 0.15])  # sorted: id1 .40, id3 .30, id4 .15, id0 .10, id2 .05
    logits = probs.log()[None]

    def kept(**kwargs):
        return set(torch.isfinite(filter_logits(logits, **kwargs))[0].nonzero().flatten().tolist())

    assert kept() == {0, 1, 2, 3, 4}
    assert kept(top_k=1) == {1}
    assert kept(top_k=2) == {1, 3}
    assert kept(top_k=3) == {1, 3, 4}
    assert kept(top_p=0.3) == {1}  # .40 >= .3
    assert kept(top_p=0.5) == {1, 3}  # .40 < .5, .70 >= .5
    assert kept(top_p=0.8) == {1, 3, 4}  # .70 < .8, .85 >= .8
    assert kept(top_p=0.9) == {0, 1, 3, 4}  # .85 < .9, .95 >= .9
    # top-p acts on the top-k-renormalised distribution: .40/.85, .30/.85 = .82 >= .8 -> drop id4
    assert kept(top_k=3, top_p=0.8) == {1, 3}
    ties = torch.tensor([[1.0, 1.0, 0.0, -1.0]])
    assert set(torch.isfinite(filter_logits(ties, top_k=1))[0].nonzero().flatten().tolist()) == {0, 1}
    # kept logits are unchanged, rows are filtered independently
    two = torch.cat([logits, logits.flip(-1)])
    out = filter_logits(two, top_k=2)
    assert torch.equal(out[0, [1, 3]], logits[0, [1, 3]])
    assert set(torch.isfinite(out[1]).nonzero().flatten().tolist()) == {1, 3}


def test_draw_only_returns_kept_ids_and_follows_the_distribution():
    probs = torch.tensor([0.10, 0.40, 0.05, 0.30, 0.15])
    logits = probs.log()[None].expand(4000, -1)
    generators = make_generators(range(4000), torch.device("cpu"))
    picked = draw(logits, SamplerSettings(top_p=0.8), generators)
    assert set(picked.tolist()) == {1, 3, 4}
    freq = torch.bincount(picked, minlength=5).float() / 4000
    torch.testing.assert_close(freq, torch.tensor([0, .40, 0, .30, .15]) / .85, atol=0.03, rtol=0)


# ---------------------------------------------------------------------------------------------
# Structure and seeds
# ---------------------------------------------------------------------------------------------

def test_image_spans_never_contain_text_ids(env):
    loaded = env["loaded"]
    vocab, eoi = loaded.vocab, loaded.text_tokenizer.eoi_id
    head = loaded.model.lm_head.weight
    original = head.detach().clone()
    with torch.no_grad():  # make text ids (incl. <eoi>, <eos>) overwhelmingly likely
        head[: vocab.image_start] *= 50
    try:
        samples = run(env, prompts=PROMPTS, n=2, temperature=2.0, cfg_scale=5.0)
    finally:
        with torch.no_grad():
            head.copy_(original)
    for sample in samples:
        assert len(sample.ids) == vocab.tokens_per_image + 1 and sample.ids[-1] == eoi
        span = torch.tensor(sample.ids[:-1])
        assert bool(vocab.is_image(span).all())
        groups = vocab.group_of(span)
        assert groups.tolist() == [vocab.span_group(t) for t in range(vocab.tokens_per_image)]
        assert torch.equal(vocab.ids_to_codes(span), sample.image_codes)
        # the tokenizer's codes (two 6-bit groups per patch), whatever grouping the decoder writes
        assert sample.image_codes.shape == (vocab.num_patches, 2)


def test_same_seed_gives_the_same_image_alone_or_in_a_batch_of_8(env):
    """8 seeds, each sampled alone (batch 1, no padding) and inside a batch of 8 images (16 rows
    with CFG, 4 prompts of different lengths, left padding). Measured match rate on CPU fp32: 8/8."""
    seeds = [11, 12, 13, 14, 15, 16, 17, 18]
    batch = run(env, prompts=PROMPTS, n=2, seeds=seeds, batch_size=8, temperature=1.0, cfg_scale=3.0)
    alone = run(env, prompts=PROMPTS, n=2, seeds=seeds, batch_size=1, temperature=1.0, cfg_scale=3.0)
    matches = sum(a.ids == b.ids for a, b in zip(alone, batch))
    assert matches == 8, f"only {matches}/8 seeds reproduce their image inside a batch"
    assert len({tuple(s.ids) for s in batch}) == 8  # different seeds, different images


def test_default_seeds_count_up_from_the_setting(env):
    samples = run(env, prompts=PROMPTS[:2], n=2, seed=40)
    assert [s.seed for s in samples] == [40, 41, 42, 43]
    assert [s.prompt for s in samples] == [PROMPTS[0]] * 2 + [PROMPTS[1]] * 2
    again = run(env, prompts=PROMPTS[1:2], n=1, seeds=[42])
    assert again[0].ids == samples[2].ids


def test_bad_api_input_is_a_user_error(env):
    with pytest.raises(UserError, match="tokens; the context"):
        run(env, prompts=["red circle " * 40])
    with pytest.raises(UserError, match="2 seeds given for 4 images"):
        run(env, seeds=[1, 2])
    with pytest.raises(UserError, match="top_p"):
        SamplerSettings(top_p=0)
    with pytest.raises(UserError, match="temperature"):
        SamplerSettings(temperature=-1)
    settings = SamplerSettings.from_defaults(env["loaded"].sampler_defaults, top_k=7, temperature=None)
    assert settings.top_k == 7 and settings.cfg_scale == 3.0 and settings.temperature == 1.0


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------

def cli(env, *args):
    return sample_cli.main(["--model", str(env["export"]), "--quiet", *args])


def test_cli_writes_pngs_grid_and_records(env, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "a blue square"}\n\nred\n')
    out = tmp_path / "out"
    assert cli(env, "--prompt", "a red circle", "--prompts", str(prompts), "--n", "2", "--out", str(out),
               "--seed", "3", "--top-k", "10", "--batch-size", "4") == 0
    records = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in records] == ["a red circle"] * 2 + ["a blue square"] * 2 + ["red"] * 2
    assert [r["seed"] for r in records] == [3, 4, 5, 6, 7, 8]
    loaded = env["loaded"]
    assert {r["checkpoint_hash"] for r in records} == {loaded.hash}
    assert records[0]["settings"] == {"temperature": 1.0, "top_k": 10, "top_p": 1.0, "cfg_scale": 3.0, "seed": 3}
    for record in records:
        assert Image.open(out / record["file"]).size == (32, 32)
    assert Image.open(out / "grid.png").size == (2 * 32 + 2, 3 * 32 + 4)
    assert "wrote 6 images" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "prompts.jsonl"]  # no temp dirs left
    # the same seed redraws the same image alone
    again = tmp_path / "again"
    assert cli(env, "--prompt", "a blue square", "--n", "1", "--seed", "6", "--top-k", "10", "--out", str(again)) == 0
    assert (again / "000-00.png").read_bytes() == (out / "001-01.png").read_bytes()


def expect_error(env, capsys, out, *args, match):
    assert cli(env, *args, "--out", str(out)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and match in err, err
    assert not out.exists()


def test_cli_errors_are_one_line_and_write_nothing(env, tmp_path, capsys):
    out = tmp_path / "out"
    expect_error(env, capsys, out, "--prompt", "  ", match="--prompt #1 is empty")
    expect_error(env, capsys, out, "--prompt", "red circle " * 40, match="the context (96 tokens)")
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"prompt": ""}\n')
    expect_error(env, capsys, out, "--prompts", str(empty), match="empty.jsonl:1: empty prompt")
    expect_error(env, capsys, out, "--prompts", str(tmp_path / "nope.txt"), match="prompts file not found")
    expect_error(env, capsys, out, match="give at least one --prompt")
    assert sample_cli.main(["--model", str(tmp_path / "missing"), "--prompt", "x", "--out", str(out)]) == 2
    assert "unified model directory not found" in capsys.readouterr().err
    broken = shutil.copytree(env["export"], tmp_path / "broken")
    (broken / "model.safetensors").unlink()
    assert sample_cli.main(["--model", str(broken), "--prompt", "x", "--out", str(out)]) == 2
    assert "missing model.safetensors" in capsys.readouterr().err
    assert not out.exists()
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert cli(env, "--prompt", "x", "--out", str(out)) == 2
    assert "pass --overwrite" in capsys.readouterr().err and (out / "keep.txt").exists()
