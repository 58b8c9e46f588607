"""Bench tool (a diagnostic, not a trainer): why does the unified model answer yes/no questions
with a constant? Linear probes on the decoder's last hidden state where it predicts the answer.

    python bench/yesno_probe.py --model runs/unified/export --codes runs/demo/codes --out probe.json

For every object of every val image (``--images``), the model reads "Is the object ⟨its place⟩
⟨c⟩?" for each colour c of the palette (answer "yes" for the object's own colour), and "What
colour is the object ⟨its place⟩?". At the ``<assistant>`` position (where the answer is
predicted) a logistic-regression probe, fit on half the images and scored on the other half, asks
what that hidden state holds:

* ``image_colour``: the named object's colour (what the image says), from the yes/no question;
* ``asked_colour``: the colour word of the question;
* ``answer``: yes/no itself (a linear read-out of the match);
* ``colour_question``: the object's colour from the colour question, for comparison.

The same split scores the model's own margin log p(yes) − log p(no) (ROC AUC against the truth).
If the object's colour is readable beside the asked colour but the answer is not, the model has
both halves and lacks only the comparison; if the object's colour is not readable, the yes/no
question does not make the model look at the object at all.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from unified_mm.data.shapesworld import DEFAULT_COLOURS, LOCATION_PHRASES  # noqa: E402
from unified_mm.export import load_unified  # noqa: E402
from unified_mm.sequence import SequenceBuilder, Turn  # noqa: E402
from unified_mm.tokenizer_cli import read_precomputed  # noqa: E402


def prompts_for(meta: dict, colours: list[str]) -> list[dict]:
    """One row per (object, asked colour) yes/no question, plus one colour question per object."""
    rows = []
    for obj in meta["objects"]:
        place = LOCATION_PHRASES[obj["position"]]
        for colour in colours:
            rows.append({"kind": "yesno", "question": f"Is the object {place} {colour}?",
                         "image_colour": obj["colour"], "asked_colour": colour,
                         "answer": int(colour == obj["colour"]), "objects": len(meta["objects"])})
        rows.append({"kind": "colour", "question": f"What colour is the object {place}?",
                     "image_colour": obj["colour"], "objects": len(meta["objects"])})
    return rows


@torch.no_grad()
def answer_states(loaded, builder: SequenceBuilder, image_codes, questions: list[str]) -> torch.Tensor:
    """Last-layer hidden states (after the final norm) at each prompt's ``<assistant>``: (Q, H)."""
    prompts = [builder.chat_prompt([Turn("user", q, image_codes)]) for q in questions]
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), loaded.text_tokenizer.pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, : len(prompt)] = torch.tensor(prompt)
        mask[row, : len(prompt)] = 1
    hidden = loaded.model.model(input_ids=ids, attention_mask=mask).last_hidden_state  # (Q, T, H)
    last = mask.sum(1) - 1
    return hidden[torch.arange(len(prompts)), last]


# The probe and the AUC are written here rather than taken from scikit-learn or SciPy: neither is
# a dependency of this project (nor installed in its environment), and each is a few lines of torch.
def fit_probe(x: torch.Tensor, y: torch.Tensor, classes: int, steps: int = 300) -> torch.nn.Linear:
    """Multinomial logistic regression (L-BFGS, small L2) on standardised features."""
    probe = torch.nn.Linear(x.shape[1], classes)
    optimizer = torch.optim.LBFGS(probe.parameters(), max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(probe(x), y) + 1e-3 * probe.weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return probe


def probe_accuracy(x: torch.Tensor, labels: list, train: torch.Tensor) -> float:
    """Held-out accuracy of a probe fit on the ``train`` rows, scored on the others."""
    names = sorted(set(labels))
    y = torch.tensor([names.index(v) for v in labels])
    mean, std = x[train].mean(0), x[train].std(0).clamp(min=1e-6)
    z = (x - mean) / std
    probe = fit_probe(z[train], y[train], len(names))
    with torch.no_grad():
        return float((probe(z[~train]).argmax(-1) == y[~train]).float().mean())


def auc(scores: torch.Tensor, truth: torch.Tensor) -> float:
    """ROC AUC by ranks (ties averaged)."""
    order = scores.argsort()
    ranks = torch.empty_like(scores)
    ranks[order] = torch.arange(1, len(scores) + 1, dtype=scores.dtype)
    for value in scores.unique():  # average tied ranks
        tied = scores == value
        ranks[tied] = ranks[tied].mean()
    positives = truth.bool()
    n_pos, n_neg = int(positives.sum()), int((~positives).sum())
    return float((ranks[positives].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="unified model export directory")
    parser.add_argument("--codes", required=True, help="precomputed codes (val split) made with its tokenizer")
    parser.add_argument("--images", type=int, default=300, help="val images to read")
    parser.add_argument("--out", default="", help="write the figures as JSON here")
    args = parser.parse_args()
    torch.manual_seed(0)
    loaded = load_unified(args.model)
    builder = SequenceBuilder(loaded.text_tokenizer, loaded.vocab, int(loaded.model.config.max_position_embeddings))
    colours = sorted(DEFAULT_COLOURS)
    rows, states, image_index = [], [], []
    samples = read_precomputed(args.codes, "val", loaded.tokenizer_hash, split_by_rank=False)
    for index, (_, image_codes, meta) in enumerate(samples):
        if index == args.images:
            break
        image_rows = prompts_for(meta, colours)
        states.append(answer_states(loaded, builder, image_codes, [r["question"] for r in image_rows]))
        rows += image_rows
        image_index += [index] * len(image_rows)
    if not states:
        raise SystemExit(f"{args.codes}: no val samples to probe")
    x = torch.cat(states)
    train_image = torch.tensor(image_index) % 2 == 0  # half the images fit, the other half score
    answer_ids = [loaded.text_tokenizer.encode(word) for word in ("yes", "no")]
    if any(len(ids) != 1 for ids in answer_ids):  # the margin compares the first answer token only
        raise SystemExit(f"'yes' / 'no' are not single text pieces ({answer_ids}): the margin needs one id each")
    logits = loaded.model.lm_head(x)
    margin = (logits[:, answer_ids[0][0]] - logits[:, answer_ids[1][0]]).detach()
    report = {"model": args.model, "images": len(states)}
    for subset, keep in (("all", lambda r: True), ("one_object", lambda r: r["objects"] == 1),
                         ("several", lambda r: r["objects"] > 1)):
        yn = torch.tensor([r["kind"] == "yesno" and keep(r) for r in rows])
        col = torch.tensor([r["kind"] == "colour" and keep(r) for r in rows])
        pick = lambda mask, field: [r[field] for r, m in zip(rows, mask) if m]  # noqa: E731
        truth = torch.tensor(pick(yn, "answer"))
        report[subset] = {
            "yesno_questions": int(yn.sum()),
            "probe_image_colour": probe_accuracy(x[yn], pick(yn, "image_colour"), train_image[yn]),
            "probe_asked_colour": probe_accuracy(x[yn], pick(yn, "asked_colour"), train_image[yn]),
            "probe_answer": probe_accuracy(x[yn], pick(yn, "answer"), train_image[yn]),
            "probe_colour_question": probe_accuracy(x[col], pick(col, "image_colour"), train_image[col]),
            "model_margin_auc": auc(margin[yn], truth),
            "chance_answer": max(float(truth.float().mean()), 1 - float(truth.float().mean())),
        }
        print(subset, json.dumps(report[subset]), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
