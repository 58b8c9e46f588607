"""bench/sweep_report.py: the per-setting table over seeds, and the table rebuilt from sweep.jsonl files."""
import json

import pytest

from bench import sweep_report


def row(variant: str, zero_shot: float, status: str = "ok", psnr: float = 29.0) -> dict:
    return {"variant": variant, "status": status, "overrides": [], "steps": 10, "batch": 4, "seconds": 1.0,
            "zero_shot_acc": zero_shot, "psnr_db": psnr, "judge_recon_acc": 0.9, "code_entropy_fraction": 0.99,
            "final_train": {"align": 0.5, "recon": 0.01}, "train_seconds": 1.0, "step_ms": 100.0}


def test_seed_section_means_and_paired_deltas():
    rows = [row("base_s0", 0.70), row("base_s1", 0.80), row("base_s2", 0.60),
            row("recon50_s0", 0.85), row("recon50_s1", 0.80), row("recon50_s3", 0.90),  # s3: no base to pair
            row("other_s0", 0.10, status="error")]
    groups = sweep_report.seed_groups(rows)
    assert set(groups) == {"base", "recon50"}  # failed rows are not averaged
    lines = sweep_report.seed_section(rows)
    recon = next(line for line in lines if line.startswith("| recon50 "))
    cells = [c.strip() for c in recon.strip("|").split("|")]
    assert cells[1] == "3" and cells[2] == "s0 85.0%, s1 80.0%, s3 90.0%"
    assert cells[3] == "85.0%"
    assert cells[4] == "+7.5 (2)"  # ((0.85 - 0.70) + (0.80 - 0.80)) / 2 over the seeds both ran
    base = next(line for line in lines if line.startswith("| base "))
    assert [c.strip() for c in base.strip("|").split("|")][4] == ""  # base is not compared to itself
    assert lines.index(recon) < lines.index(base)  # sorted by mean zero-shot


def test_no_seed_section_without_repeats():
    assert sweep_report.seed_section([row("baseline", 0.5), row("lr_2e-3", 0.6), row("x_s0", 0.7)]) == []
    assert "Per setting" not in sweep_report.markdown([row("baseline", 0.5)], {"base": "b", "data": "d", "device": "cpu"})


def test_main_rebuilds_the_table_from_several_files(tmp_path, capsys):
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    first.write_text(json.dumps(row("base_s0", 0.7)) + "\n" + json.dumps(row("base_s1", 0.8)) + "\n")
    second.write_text(json.dumps(row("hn8_s0", 0.75)) + "\n\n")
    out = tmp_path / "table.md"
    assert sweep_report.main([str(first), str(second), "--out", str(out), "--device", "cuda"]) == 0
    text = out.read_text()
    assert "device cuda" in text and "| hn8_s0 | 75.0%" in text and "| hn8 | 1 | s0 75.0% | 75.0% | +5.0 (1)" in text


@pytest.mark.parametrize("content, message", [
    (None, "sweep results not found"),
    ('{"variant": "x", "status": "ok", "overrides": []}\nnot json\n', "b.jsonl:2: invalid JSON"),
    ('{"variant": "x", "status": "ok", "overrides": []}\n{"variant": "y"}\n', "b.jsonl:2: not a sweep row"),
    ('[1, 2]\n', "b.jsonl:1: not a sweep row"),
])
def test_main_names_the_bad_file(tmp_path, capsys, content, message):
    path = tmp_path / "b.jsonl"
    if content is not None:
        path.write_text(content)
    out = tmp_path / "table.md"
    assert sweep_report.main([str(path), "--out", str(out)]) == 2
    assert message in capsys.readouterr().err and not out.exists()
