"""Chat / VQA: history rendered by the training template, image questions by path, image answers
inside a conversation, greedy text decoding against full forwards, and the chat CLI."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from mmcore.errors import UserError
from sampling_env import make_export
from tokenizer.images import encode_images, load_image
from unified_mm import chat as chat_module
from unified_mm import chat_cli
from unified_mm.chat import ChatSession
from unified_mm.export import load_unified
from unified_mm.generate import greedy_text
from unified_mm.sampling import SamplerSettings
from unified_mm.sequence import Turn


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    export = make_export(root)
    image = root / "shape.png"
    pixels = np.full((32, 32, 3), 255, np.uint8)
    pixels[8:24, 8:24] = (220, 30, 30)
    Image.fromarray(pixels).save(image)
    (root / "notes.txt").write_text("not an image")
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(root / "small.png")
    return {"root": root, "export": export, "loaded": load_unified(export), "image": image}


def training_ids(session):
    """The training sequence of the session's conversation (the 'chat' task template)."""
    sequence = session.builder.chat(session.history)
    assert sequence is not None
    return sequence.ids


def test_history_is_rendered_by_the_training_template(env):
    """Each prompt is the exact prefix of the training sequence of the conversation so far. Text
    replies are kept as text and rendered (re-tokenised) as training renders text, so the next
    prompt holds the canonical pieces of the reply, which decode to the same text."""
    session = ChatSession(env["loaded"])
    tok = session.tok
    first = session.ask("what colour is the circle?", image_path=env["image"], max_new_tokens=6)
    assert session.last_prompt == session.builder.chat_prompt([session.history[0]])
    assert training_ids(session)[: len(session.last_prompt)] == session.last_prompt
    prompt_1 = list(session.last_prompt)
    second = session.ask("how many shapes are there?", max_new_tokens=6)
    ids = training_ids(session)
    assert session.last_prompt == session.builder.chat_prompt(session.history[:3])
    assert ids[: len(session.last_prompt)] == session.last_prompt
    # the second prompt = first prompt, the first answer as training renders it, <eos>, the question
    assert session.last_prompt[: len(prompt_1)] == prompt_1
    answer_1 = session.last_prompt[len(prompt_1): session.last_prompt.index(tok.eos_id, len(prompt_1))]
    assert answer_1 == tok.encode(first.text) and tok.decode(answer_1) == tok.decode(first.ids)
    assert second.text == tok.decode(second.ids)
    assert [t.role for t in session.history] == ["user", "assistant"] * 2
    assert torch.equal(torch.as_tensor(session.history[0].image_codes), session.encode_image(env["image"]))
    session.reset()
    assert session.history == []


def test_image_by_path_is_encoded_with_the_bundled_tokenizer(env):
    session = ChatSession(env["loaded"])
    codes = session.encode_image(env["image"])
    expected = encode_images(session.qlip.model, load_image(env["image"], 32)[None])[1][0]
    assert torch.equal(codes, expected) and codes.shape == (16, 2)
    session.ask("what is this?", image_path=env["image"], max_new_tokens=2)
    span = session.builder.image_ids(codes)
    prompt = session.last_prompt
    start = prompt.index(session.tok.boi_id) + 1
    assert prompt[start: start + len(span)] == span and prompt[start + len(span)] == session.tok.eoi_id


def test_the_model_can_answer_with_an_image(env, monkeypatch):
    """Force <boi> first (a bias on the text head): the span is sampled under the structural
    constraint, <eoi> appended, decoding continues to <eos>, and the history holds the image."""
    loaded = env["loaded"]
    boi = loaded.text_tokenizer.boi_id
    original = chat_module.head_logits

    def open_image(model, hidden, start=0, end=None):
        logits = original(model, hidden, start, end)
        if start == 0 and end == loaded.vocab.image_start:
            logits[:, boi] += 1e4
        return logits

    monkeypatch.setattr(chat_module, "head_logits", open_image)
    session = ChatSession(loaded, SamplerSettings(cfg_scale=2.0, seed=3))
    reply = session.ask("draw a red circle", max_new_tokens=5)
    vocab, tok = loaded.vocab, loaded.text_tokenizer
    n = vocab.tokens_per_image
    assert reply.ids[0] == boi and reply.ids[n + 1] == tok.eoi_id
    span = torch.tensor(reply.ids[1: n + 1])
    assert torch.equal(vocab.ids_to_codes(span), reply.image_codes)  # every id in its group's range
    assert reply.image_codes.shape == (vocab.num_patches, vocab.num_groups)
    assert boi not in reply.ids[n + 2:] and len(reply.ids) <= n + 2 + 5
    assert session.history[-1] == Turn("assistant", reply.text, reply.image_codes)
    ids = training_ids(session)
    image_part = reply.ids[: n + 2]  # <boi> img <eoi>: rendered id for id; the text after is re-tokenised
    assert ids[len(session.last_prompt): len(session.last_prompt) + n + 2] == image_part
    assert ids[len(session.last_prompt) + n + 2:] == [*tok.encode(reply.text), tok.eos_id]
    assert session.decode_image(reply.image_codes).shape == (3, 32, 32)
    replay = ChatSession(loaded, SamplerSettings(cfg_scale=2.0, seed=3)).ask("draw a red circle", max_new_tokens=5)
    assert replay.ids == reply.ids  # same seed, same conversation, same image


def test_greedy_text_matches_full_forwards(env):
    """The shared KV-cached decoder (left padding) against argmax over text ids of full forwards."""
    loaded = env["loaded"]
    tok, vocab, model = loaded.text_tokenizer, loaded.vocab, loaded.model
    session = ChatSession(loaded)
    prompts = [session.builder.chat_prompt([Turn("user", q)]) for q in ("red", "how many shapes are there?")]
    answers = greedy_text(model, vocab, prompts, pad_id=tok.pad_id, eos_id=tok.eos_id, max_new_tokens=5)
    for prompt, answer in zip(prompts, answers):
        ids, expected = list(prompt), []
        for _ in range(5):
            with torch.no_grad():
                next_id = int(model(input_ids=torch.tensor([ids])).logits[0, -1, : vocab.image_start].argmax())
            if next_id == tok.eos_id:
                break
            expected.append(next_id)
            ids.append(next_id)
        assert answer == expected


def test_bad_images_and_overlong_questions_are_user_errors(env):
    session = ChatSession(env["loaded"])
    with pytest.raises(UserError, match="image not found"):
        session.ask("what?", image_path=env["root"] / "missing.png")
    with pytest.raises(UserError, match="is not an image"):
        session.ask("what?", image_path=env["root"] / "notes.txt")
    with pytest.raises(UserError, match="16x16"):
        session.ask("what?", image_path=env["root"] / "small.png")
    with pytest.raises(UserError, match="empty question"):
        session.ask("  ")
    with pytest.raises(UserError, match="does not fit the context"):
        session.ask("red " * 100)
    assert session.history == []  # failed questions leave no trace


def test_old_turns_are_dropped_when_the_context_is_full(env):
    session = ChatSession(env["loaded"])
    for _ in range(4):
        session.ask("what colour is the circle?", image_path=env["image"], max_new_tokens=4)
        assert len(session.last_prompt) + 4 <= session.context
    assert len(session.history) < 8 and session.history[0].role == "user"


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------

def cli(env, *args, stdin=None):
    return chat_cli.main(["--model", str(env["export"]), "--max-new-tokens", "4", *args], stdin=stdin)


def test_cli_one_shot_prints_the_answer(env, capsys):
    assert cli(env, "--image", str(env["image"]), "--question", "what colour is it?") == 0
    out = capsys.readouterr().out
    expected = ChatSession(env["loaded"]).ask("what colour is it?", image_path=env["image"], max_new_tokens=4)
    assert out == expected.text + "\n"


def test_cli_interactive_commands(env, tmp_path, capsys):
    lines = io.StringIO(f"/image {env['root'] / 'nope.png'}\n/image {env['image']}\nwhat is it?\n"
                        "/bogus\n/reset\nred\n/quit\nnever asked\n")
    assert cli(env, "--out", str(tmp_path / "imgs"), stdin=lines) == 0
    captured = capsys.readouterr()
    errors = captured.err.strip().splitlines()
    assert len(errors) == 2 and errors[0].startswith("error: image not found") and "unknown command" in errors[1]
    assert "(image attached:" in captured.out and "(conversation reset)" in captured.out


def test_cli_bad_input_is_one_line_exit_2(env, tmp_path, capsys):
    for image, match in ((env["root"] / "missing.png", "image not found"),
                         (env["root"] / "notes.txt", "is not an image")):
        assert cli(env, "--image", str(image), "--question", "what?") == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and match in err
    assert chat_cli.main(["--model", str(tmp_path / "nope"), "--question", "hi"]) == 2
    assert "unified model directory not found" in capsys.readouterr().err
