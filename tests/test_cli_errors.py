"""Every CLI: a bad argument, file or field is one `error: ...` line naming it, exit code 2, and
no output left behind (issue 7, input validation across CLIs)."""
import importlib
from pathlib import Path

import pytest

MISSING = "/nonexistent/qlip-test-path"


def cases(tmp: Path):
    out = tmp / "out"
    not_image = tmp / "notes.txt"
    not_image.write_text("not an image")
    bad_yaml = tmp / "bad.yaml"
    bad_yaml.write_text("steps: [1, 2\n")
    return [
        ("unified_mm.data.shapesworld_cli", ["--config", MISSING, "--out", str(out)], MISSING),
        ("unified_mm.data.shapesworld_cli", ["--config", "configs/data/shapesworld.yaml", "--out", str(out),
                                             "image_size=-3"], "image_size"),
        ("train.text_tokenizer", ["--config", "configs/text_tokenizer.yaml", f"data={MISSING}",
                                  f"out={out / 't.model'}"], MISSING),
        ("unified_mm.tokenizer_cli", ["encode", "--tokenizer", MISSING, str(not_image), "--out",
                                      str(out / "c.json")], MISSING),
        ("unified_mm.tokenizer_cli", ["precompute", "--tokenizer", MISSING, "--data", MISSING, "--out", str(out)],
         MISSING),
        ("unified_mm.data.convert_cli", ["coco", "--json", MISSING, "--images", str(tmp), "--out", str(out),
                                         "--image-size", "32"], MISSING),
        ("unified_mm.sample_cli", ["--model", MISSING, "--prompt", "a red circle", "--out", str(out)], MISSING),
        ("unified_mm.chat_cli", ["--model", MISSING, "--question", "what colour?"], MISSING),
        ("eval.run", ["--model", MISSING, "--tasks", "vqa", "--out", str(out)], MISSING),
        ("eval.run", ["--tasks", "ocr", "--out", str(out)], "ocr"),
        ("train.tokenizer", ["--config", str(bad_yaml)], "bad.yaml"),
        ("train.unified", ["--config", "configs/unified/tiny.yaml", "optim.lrr=1"], "lrr"),
        ("train.unified", ["--config", "configs/unified/tiny.yaml", f"data.tokenizer={MISSING}",
                           f"out_dir={out}"], MISSING),
        ("train.lm_smoke", ["--config", "configs/smoke/lm_smoke.yaml", "engine.deepspeed_config=" + MISSING], MISSING),
    ]


@pytest.mark.parametrize("index", range(14))
def test_cli_bad_input_is_one_line_error(index, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    module, argv, named = cases(tmp_path)[index]
    main = importlib.import_module(module).main
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse usage errors
        code = exit_.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, (module, argv, err)
    errors = [line for line in err if line.startswith("error:") or ": error:" in line]
    assert len(errors) == 1, (module, err)  # one message (argparse may add its usage line before it)
    assert named in errors[0], (module, errors[0])
    assert "Traceback" not in "\n".join(err)
    assert not (tmp_path / "out").exists(), f"{module} left output behind"
