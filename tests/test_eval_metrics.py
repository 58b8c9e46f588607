"""Metric functions of the evaluation harness against hand-computed cases (issue 6).

VQAv2 normalisation: one case per official rule; soft accuracy with 10 answers of which k match;
BLEU and CIDEr-D on tiny corpora whose scores are worked out term by term below; SSIM against a
loop-by-loop reference and closed forms; FID against closed forms; the GenEval-style judge on
ground-truth renders (must be perfect) and on deliberately wrong ones.
"""
import io
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from eval.formats import GenEvalPrompt, read_geneval_jsonl, write_geneval_jsonl
from eval.metrics import caption, geneval, image, vqa
from mmcore.errors import UserError
from unified_mm.data.shapesworld import ShapesWorldConfig, SplitSizes, generate_split, render, scene_from_meta


# ---------------------------------------------------------------------------------------------
# VQAv2 normalisation, one rule at a time
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("raw, expected", [
    ("yes\n", "yes"), ("\tno ", "no"),                      # rule 1: newline/tab, strip
    ("black/white", "black white"),                          # mark not next to a space -> space
    ("hi-fi", "hi fi"), ("hi-fi -", "hifi"),                 # ' -' present -> every '-' deleted
    ("red, white", "red white"), ("what?!", "what"),
    ("1,000", "1000"), ("1,000 (approx)", "1000 approx"),   # digit-comma-digit -> all deleted
    ("yes.", "yes"), ("3.5", "3.5"), ("2.5.", "2.5"),       # periods kept only before a digit
    ("10:30", "10:30"), ("dog's", "dog's"),                  # colon and apostrophe untouched
    ("Two", "2"), ("none", "0"), ("TEN", "10"), ("eleven", "eleven"),  # manual map
    ("a dog", "dog"), ("The Cat", "cat"), ("an apple", "apple"), ("theater", "theater"),
    ("dont", "don't"), ("isnt", "isn't"), ("youre", "you're"), ("oclock", "o'clock"),
    ("Im", "im"),                 # the table's capitalised keys never match after lower-casing
    ("The two dogs, dont!", "2 dogs don't"),
])
def test_vqa_normalisation_rules(raw, expected):
    assert vqa.normalize_answer(raw) == expected


def test_punctuation_decision_uses_the_input_text():
    # '(' is next to a space in the input, so it is deleted; ')' is not, so it becomes a space
    assert vqa.process_punctuation("a (b)c") == "a b c"


@pytest.mark.parametrize("matches, expected", [
    (0, 0.0),
    (1, (1 * 0 + 9 * (1 / 3)) / 10),                # = 0.3
    (2, (2 * (1 / 3) + 8 * (2 / 3)) / 10),          # matching annotators see 1 other, the rest 2
    (3, (3 * (2 / 3) + 7 * 1.0) / 10),              # = 0.9
    (4, (4 * 1.0 + 6 * 1.0) / 10),                  # = 1.0: 3 others always match
])
def test_vqa_soft_accuracy_leave_one_out(matches, expected):
    answers = ["2"] * matches + ["3"] * (10 - matches)
    assert vqa.vqa_soft_accuracy("two.", answers) == pytest.approx(expected)


def test_vqa_soft_accuracy_named_values():
    ten = lambda k: ["2"] * k + ["3"] * (10 - k)  # noqa: E731
    assert [vqa.vqa_soft_accuracy("2", ten(k)) for k in (2, 3, 4)] == pytest.approx([0.6, 0.9, 1.0])


def test_vqa_references_get_only_the_punctuation_rule_unless_asked():
    answers = ["Two"] * 5 + ["3"] * 5               # raw references: "Two" is not "2" officially
    assert vqa.vqa_soft_accuracy("2", answers) == 0.0
    assert vqa.vqa_soft_accuracy("2", answers, normalise_references=True) == 1.0
    assert vqa.prepare_references(["yes", "yes"]) == ["yes", "yes"]   # all agree: untouched


def test_vqa_scores_per_answer_type():
    answers = {1: ["yes"] * 10, 2: ["2"] * 2 + ["1"] * 8, 3: ["red"] * 10}
    scores = vqa.vqa_scores({1: "Yes", 2: "two", 3: "blue"}, answers,
                            answer_types={1: "yes/no", 2: "number", 3: "other"})
    assert scores.per_question == pytest.approx({1: 1.0, 2: 0.6, 3: 0.0})
    assert scores.overall == pytest.approx(1.6 / 3)
    assert scores.per_answer_type == pytest.approx({"number": 0.6, "other": 0.0, "yes/no": 1.0})
    with pytest.raises(ValueError, match="no prediction"):
        vqa.vqa_scores({1: "yes"}, answers)


def test_exact_match_gqa_style():
    assert vqa.exact_match("Two.", "2") and vqa.exact_match("the left", "left")
    assert not vqa.exact_match("red", "blue")
    assert vqa.exact_match_accuracy(["Yes", "no", "cat"], ["yes", "yes", "a cat"]) == pytest.approx(2 / 3)


def test_yes_no_pope_style():
    assert vqa.yes_no_label("Yes, there is a cat.") == "yes"
    assert vqa.yes_no_label("No, there is not.") == "no"
    assert vqa.yes_no_label("There is no dog in the image.") == "no"
    assert vqa.yes_no_label("Yes. No dog is missing.") == "yes"     # only the first sentence
    # TP: 0, 4; FP: 1; TN: 2; FN: 3
    scores = vqa.yes_no_scores(["yes", "Yes.", "no", "No", "yes it is"], ["yes", "no", "no", "yes", "YES"])
    assert scores.accuracy == pytest.approx(3 / 5)
    assert scores.precision == pytest.approx(2 / 3) and scores.recall == pytest.approx(2 / 3)
    assert scores.f1 == pytest.approx(2 / 3) and scores.yes_ratio == pytest.approx(3 / 5)
    assert vqa.yes_no_scores(["no"], ["yes"]).f1 == 0.0
    with pytest.raises(ValueError, match="'yes' or 'no'"):
        vqa.yes_no_scores(["yes"], ["maybe"])


# ---------------------------------------------------------------------------------------------
# Captioning
# ---------------------------------------------------------------------------------------------

def test_caption_tokenisation_is_coco_style():
    assert caption.tokenize_caption("A Dog's toy, don't (it) -- sits on 3.5 mats.") == \
        ["a", "dog", "'s", "toy", "do", "n't", "it", "sits", "on", "3.5", "mats"]
    assert caption.closest_reference_length(5, [3, 7, 9]) == 3   # tie 3 vs 7: the shorter


def test_bleu_identical_candidates_score_one():
    refs = {1: ["a red circle on the left", "a red circle on the left"], 2: ["two blue squares here"] * 3}
    cands = {1: "A red circle on the left.", 2: "two blue squares here"}
    scores = caption.bleu(cands, refs)
    assert all(scores[f"bleu_{n}"] == pytest.approx(1.0, abs=1e-9) for n in range(1, 5))


def test_bleu_two_segment_corpus_by_hand():
    cands = {"a": "the cat sat on the mat", "b": "a big red ball"}
    refs = {"a": ["the cat is on the mat", "there is a cat on the mat"],
            "b": ["a big red ball on grass", "there is a big red ball"]}
    # segment a (6 words, closest ref 6): 1-grams 5/6 ("sat" unmatched, "the" x2 clipped at 2),
    #   2-grams 3/5 (the cat, on the, the mat), 3-grams 1/4 (on the mat), 4-grams 0/3
    # segment b (4 words, closest ref 6): 4/4, 3/3, 2/2, 1/1
    # corpus: p1 = 9/10, p2 = 6/8, p3 = 3/6, p4 = 1/4; c = 10, r = 12 -> BP = exp(1 - 12/10)
    p = [9 / 10, 6 / 8, 3 / 6, 1 / 4]
    bp = math.exp(1 - 12 / 10)
    scores = caption.bleu(cands, refs)
    for n in range(1, 5):
        assert scores[f"bleu_{n}"] == pytest.approx(math.prod(p[:n]) ** (1 / n) * bp, rel=1e-7)
    # segment a alone: no 4-gram match -> the toolkit's smoothing leaves a tiny positive BLEU-4
    alone = caption.bleu({"a": cands["a"]}, {"a": refs["a"]})
    assert alone["bleu_3"] == pytest.approx(0.5)                      # (5/6 * 3/5 * 1/4)^(1/3)
    assert alone["bleu_4"] == pytest.approx((0.125 * 1e-15 / 3) ** 0.25, rel=1e-6)


def test_cider_d_tiny_corpus_by_hand():
    cands = {1: "Red red circle.", 2: "blue square"}
    refs = {1: ["red circle", "a blue circle"], 2: ["blue square", "a green square"]}
    # Two images: idf = log(2) - log(df). "a" and "blue" occur in both images' references
    # (df 2 -> weight 0); every other n-gram has df 1 or 0 -> weight L = log 2.
    # Lengths are bigram counts: cand1 2, "red circle" 1, "a blue circle" 2, cand2 1, refs 1, 2.
    g = math.exp(-1 / (2 * 6 ** 2))                   # Gaussian penalty for a length gap of 1
    # cand1 1-grams {red: 2L, circle: L} (norm L*sqrt5), 2-grams {red red: L, red circle: L}:
    #   vs "red circle": 1-gram (min(2L,L)L + L*L) / (L sqrt5 * L sqrt2) = 2/sqrt10,
    #                    2-gram L*L / (L sqrt2 * L) = 1/sqrt2, higher orders 0, gap 1 -> * g
    #   vs "a blue circle" (1-grams {a: 0, blue: 0, circle: L}): 1-gram L*L / (L sqrt5 * L) = 1/sqrt5
    image1 = 10 * ((g * (2 / math.sqrt(10) + 1 / math.sqrt(2)) + 1 / math.sqrt(5)) / 4) / 2
    # cand2 {blue: 0, square: L}, {blue square: L}: identical ref gives [1, 1, 0, 0];
    #   vs "a green square" (norm L sqrt2): 1-gram L*L / (L * L sqrt2) = 1/sqrt2, gap 1 -> * g
    image2 = 10 * ((2 + g / math.sqrt(2)) / 4) / 2
    result = caption.cider_d(cands, refs)
    assert result.per_image[1] == pytest.approx(image1, rel=1e-9)
    assert result.per_image[2] == pytest.approx(image2, rel=1e-9)
    assert result.score == pytest.approx((image1 + image2) / 2, rel=1e-9)
    assert caption.caption_scores(cands, refs)["cider_d"] == pytest.approx(result.score)


def test_caption_inputs_are_checked():
    with pytest.raises(ValueError, match="different images"):
        caption.cider_d({1: "a"}, {2: ["a"]})
    with pytest.raises(ValueError, match="non-empty list"):
        caption.bleu({1: "a"}, {1: []})


# ---------------------------------------------------------------------------------------------
# PSNR, SSIM, FID
# ---------------------------------------------------------------------------------------------

def test_psnr_known_values():
    zeros = np.zeros((4, 4, 3), np.uint8)
    assert image.psnr(zeros, zeros + 1) == pytest.approx(20 * math.log10(255))
    a = np.full((4, 4), 0.5)
    assert image.psnr(a, a + 0.1) == pytest.approx(20.0)          # mse 0.01 on [0, 1]
    assert image.psnr(a, a) == math.inf
    with pytest.raises(ValueError, match="dtype"):
        image.psnr(zeros, zeros.astype(np.float32))


def _reference_ssim(x: np.ndarray, y: np.ndarray, data_range: float) -> float:
    """Wang et al. 2004, window by window with the explicit 2-D Gaussian (one channel)."""
    taps = np.exp(-((np.arange(11) - 5) ** 2) / (2 * 1.5 ** 2))
    w = np.outer(taps, taps) / np.outer(taps, taps).sum()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    values = []
    for i in range(x.shape[0] - 10):
        for j in range(x.shape[1] - 10):
            px, py = x[i:i + 11, j:j + 11], y[i:i + 11, j:j + 11]
            mx, my = (w * px).sum(), (w * py).sum()
            vx, vy = (w * (px - mx) ** 2).sum(), (w * (py - my) ** 2).sum()
            cov = (w * (px - mx) * (py - my)).sum()
            values.append((2 * mx * my + c1) * (2 * cov + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2)))
    return float(np.mean(values))


def test_ssim_matches_windowwise_reference_and_is_symmetric():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (14, 13, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-40, 41, a.shape), 0, 255).astype(np.uint8)
    expected = np.mean([_reference_ssim(a[..., c].astype(float), b[..., c].astype(float), 255.0)
                        for c in range(3)])
    assert image.ssim(a, b) == pytest.approx(expected, rel=1e-9)
    assert image.ssim(a, b) == pytest.approx(image.ssim(b, a), rel=1e-12)
    assert image.ssim(a, b) == pytest.approx(image.ssim(a / 255.0, b / 255.0), rel=1e-9)  # C scales with L
    assert image.ssim(a, a) == pytest.approx(1.0, abs=1e-12)


def test_ssim_constant_shift_closed_form():
    # equal variances and covariance: structure term 1, SSIM = luminance term of the local means
    x = np.full((16, 16), 0.3)
    c1 = (0.01 * 1.0) ** 2
    expected = (2 * 0.3 * 0.4 + c1) / (0.3 ** 2 + 0.4 ** 2 + c1)
    assert image.ssim(x, x + 0.1) == pytest.approx(expected, rel=1e-9)
    ramp = np.tile(np.linspace(0.1, 0.5, 16), (16, 1))             # textured: same per window
    mu = image._filter_valid(ramp, image.gaussian_window())
    shifted = ((2 * mu * (mu + 0.2) + c1) / (mu ** 2 + (mu + 0.2) ** 2 + c1)).mean()
    assert image.ssim(ramp, ramp + 0.2) == pytest.approx(shifted, rel=1e-9)
    with pytest.raises(ValueError, match=">= 11"):
        image.ssim(np.zeros((8, 8)), np.zeros((8, 8)))


def test_fid_closed_forms():
    rng = np.random.default_rng(1)
    feats = rng.normal(size=(50, 6))
    assert image.fid_from_features(feats, feats) == pytest.approx(0.0, abs=1e-8)
    shift = np.array([1.0, -2.0, 0.5, 0.0, 3.0, 1.0])
    assert image.fid_from_features(feats, feats + shift) == pytest.approx(shift @ shift, rel=1e-8)
    # exactly diagonal sample covariances: cov_a = 4/3 I, cov_b = 16/3 I, means 0 and (3, 0)
    a = np.array([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]])
    b = 2 * a + np.array([3.0, 0.0])
    per_dim = (math.sqrt(4 / 3) - math.sqrt(16 / 3)) ** 2
    assert image.fid_from_features(a, b) == pytest.approx(9 + 2 * per_dim, rel=1e-10)   # = 35/3


def test_trace_sqrt_product_against_eigenvalues_of_the_product():
    rng = np.random.default_rng(2)
    m, n = rng.normal(size=(5, 5)), rng.normal(size=(5, 3))
    cov_a, cov_b = m @ m.T, n @ n.T                     # full rank and rank-deficient
    direct = np.sqrt(np.clip(np.linalg.eigvals(cov_a @ cov_b).real, 0, None)).sum()
    assert image.trace_sqrt_product(cov_a, cov_b) == pytest.approx(direct, rel=1e-7)
    assert image.trace_sqrt_product(cov_b, cov_a) == pytest.approx(direct, rel=1e-7)
    assert image.trace_sqrt_product(cov_a, cov_a) == pytest.approx(np.trace(cov_a), rel=1e-9)


def _write_conv_net(directory, channels=(4, 8)) -> torch.nn.Module:
    from safetensors.torch import save_file
    torch.manual_seed(0)
    cfg = image.ConvNetConfig(channels=list(channels), input_size=16)
    net = image.build_conv_feature_net(cfg)
    directory.mkdir()
    save_file(net.state_dict(), str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(
        {"format": "conv-feature-net", "channels": list(channels), "in_channels": 3, "kernel_size": 3,
         "input_size": 16, "input_scale": 1.0}))
    return net


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_feature_network_safetensors_and_torchscript(tmp_path):
    net = _write_conv_net(tmp_path / "net")
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (6, 20, 20, 3), dtype=np.uint8)      # resized to 16 inside
    loaded = image.load_feature_network(tmp_path / "net")
    feats = loaded.features(images, batch_size=4)
    assert feats.shape == (6, 8)
    assert image.load_feature_network(tmp_path / "net" / "config.json").source == str(tmp_path / "net")
    assert image.fid(loaded, images, images) == pytest.approx(0.0, abs=1e-8)
    assert image.fid(loaded, images, 255 - images) > 0
    torch.jit.script(net).save(str(tmp_path / "net.pt"))
    scripted = image.load_feature_network(tmp_path / "net.pt", input_size=16)
    np.testing.assert_allclose(scripted.features(images), feats, rtol=1e-6, atol=1e-9)


def test_feature_network_errors(tmp_path):
    _write_conv_net(tmp_path / "net")
    config = json.loads((tmp_path / "net" / "config.json").read_text())
    (tmp_path / "net" / "config.json").write_text(json.dumps({**config, "channels": [4, 9]}))
    with pytest.raises(UserError, match="do not match config.json"):
        image.load_feature_network(tmp_path / "net")
    (tmp_path / "net" / "config.json").write_text(json.dumps({**config, "depth": 3}))
    with pytest.raises(UserError, match="unknown field 'depth'"):
        image.load_feature_network(tmp_path / "net")
    torch.save({"weight": torch.zeros(2)}, tmp_path / "pickled.pt")   # a pickle checkpoint
    with pytest.raises(UserError, match="not a TorchScript archive"):
        image.load_feature_network(tmp_path / "pickled.pt")
    with pytest.raises(UserError, match="not found"):
        image.load_feature_network(tmp_path / "missing")


# ---------------------------------------------------------------------------------------------
# GenEval-style judge on ShapesWorld
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def world():
    cfg = ShapesWorldConfig(splits=SplitSizes(train=0, val=0, test=10))
    samples = [(Image.open(io.BytesIO(png)).convert("RGB"), meta) for _, png, meta in generate_split(cfg, "test")]
    return cfg, samples


def test_judge_scores_ground_truth_renders_perfectly(world):
    cfg, samples = world
    kinds = ("short", "long", "sentence")
    prompts = geneval.prompts_from_metas([m for _, m in samples], kinds)
    images = [img for img, _ in samples for _ in kinds]
    summary, _ = geneval.evaluate_images(images, prompts, cfg)
    assert summary["num_prompts"] == 30
    assert {k: summary[k] for k in ("whole", "colour", "shape", "count", "position", "size")} == \
        dict.fromkeys(("whole", "colour", "shape", "count", "position", "size"), 1.0)
    assert geneval.reference_accuracy([m for _, m in samples], cfg)["whole"] == 1.0


def test_judge_catches_wrong_colour_and_missing_object(world):
    cfg, samples = world
    image_, meta = next((img, m) for img, m in samples if len(m["objects"]) >= 2)
    prompt = geneval.prompt_from_meta(meta, "long")
    recoloured = json.loads(json.dumps(meta))
    first = recoloured["objects"][0]
    first["colour"] = next(c for c in cfg.colours if c != first["colour"])
    judged = geneval.judge_image(render(scene_from_meta(recoloured), cfg), prompt, cfg)
    assert judged.scores["colour"] is False and judged.scores["shape"] is True
    assert judged.scores["count"] is True and judged.whole is False
    fewer = json.loads(json.dumps(meta))
    fewer["objects"] = fewer["objects"][1:]
    judged = geneval.judge_image(render(scene_from_meta(fewer), cfg), prompt, cfg)
    assert judged.scores["count"] is False and judged.whole is False
    assert geneval.judge_image(image_, prompt, cfg).whole is True


def test_prompt_records_group_counts_and_round_trip(tmp_path):
    meta = {"key": "test-000007", "captions": ["a red circle and a red circle", "long", "sentence"],
            "objects": [{"colour": "red", "shape": "circle", "size": "small", "position": "top"},
                        {"colour": "red", "shape": "circle", "size": "large", "position": "center"}]}
    short = geneval.prompt_from_meta(meta, "short")
    assert short.include == [{"class": "circle", "count": 2, "color": "red"}] and short.tag == "short:2"
    long = geneval.prompt_from_meta(meta, "long")
    assert long.include[1] == {"class": "circle", "count": 1, "color": "red", "size": "large",
                               "position": "center"}
    write_geneval_jsonl(tmp_path / "prompts.jsonl", [short, long])
    assert read_geneval_jsonl(tmp_path / "prompts.jsonl") == [short, long]
    assert len(geneval.requirements_for(short, ShapesWorldConfig())) == 2


def test_prompt_values_outside_the_world_are_refused():
    cfg = ShapesWorldConfig()
    bad_colour = GenEvalPrompt("a pink circle", "x", [{"class": "circle", "count": 1, "color": "pink"}], [])
    with pytest.raises(UserError, match="color 'pink' is not in this ShapesWorld"):
        geneval.requirements_for(bad_colour, cfg)
    relative = GenEvalPrompt("p", "position", [{"class": "circle", "count": 1, "position": ["left of", 1]}], [])
    with pytest.raises(UserError, match="relative position"):
        geneval.requirements_for(relative, cfg)
    with pytest.raises(UserError, match="no 'objects'"):
        geneval.prompt_from_meta({"key": "k", "captions": ["a"]}, "short")


def test_summary_breaks_accuracy_down_by_prompt_tag():
    """per_tag_scores: each tag's whole-prompt and attribute accuracies over its own prompts only."""
    def judged(whole, count, position=None):
        scores = {"colour": True, "shape": whole, "count": count, "position": position, "size": None}
        return geneval.Judgement(scores, whole, [])

    prompts = [GenEvalPrompt("a red circle", "short:1", [], []), GenEvalPrompt("a red circle", "short:1", [], []),
               GenEvalPrompt("a red circle on the left", "long:1", [], [])]
    judgements = [judged(True, True), judged(False, False), judged(False, True, position=False)]
    summary = geneval.summarise(judgements, prompts)
    assert summary["per_tag"] == {"long:1": 0.0, "short:1": 0.5}
    assert summary["per_tag_scores"]["short:1"] == {"whole": 0.5, "colour": 1.0, "shape": 0.5, "count": 0.5, "n": 2}
    assert summary["per_tag_scores"]["long:1"] == {"whole": 0.0, "colour": 1.0, "shape": 0.0, "count": 1.0,
                                                   "position": 0.0, "n": 1}
    assert summary["count"] == 2 / 3 and summary["position"] == 0.0 and "size" not in summary
