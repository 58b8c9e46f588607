"""scripts/ablation.py: seeds, the table and verdict over seeds, reuse of finished runs, bad input."""
import json

import pytest

from tests.script_env import load_script


@pytest.fixture(scope="module")
def ablation():
    return load_script("scripts/ablation.py", "ablation_script")


def result(zero_shot: float | None, psnr: float, recon: float, align: float, judge: float = 0.9) -> dict:
    metrics = {"psnr_db": psnr, "judge_recon_acc": judge}
    if zero_shot is not None:
        metrics["zero_shot_acc"] = zero_shot
    return {"metrics": metrics, "loss_weights": {"recon": recon, "align": align, "quantizer": 1.0}}


def results_over_seeds() -> dict:
    return {
        "align-only": {0: result(0.80, 8.0, 0, 1, 0.0), 1: result(0.90, 8.2, 0, 1, 0.0)},
        "recon-only": {0: result(None, 30.0, 50, 0), 1: result(None, 29.0, 50, 0)},
        "balanced": {0: result(0.75, 29.5, 50, 1), 1: result(0.92, 28.0, 50, 1)},
    }


def test_parse_seeds(ablation):
    assert ablation.parse_seeds("0,1, 2") == [0, 1, 2]
    for bad in ("0,x", "", "1,1"):
        with pytest.raises(ablation.UserError, match="--seeds"):
            ablation.parse_seeds(bad)


def test_table_shows_means_and_each_seed(ablation):
    lines = ablation.table(results_over_seeds()).splitlines()
    cells = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")] for line in lines[2:]}
    assert cells["align-only"][2] == "0, 1"
    assert cells["align-only"][3] == "85.0% (80.0, 90.0)"
    assert cells["align-only"][4] == "8.10 (8.00, 8.20) (decoder untrained)"
    assert cells["recon-only"][3] == "n/a (no alignment)"
    assert cells["balanced"][1] == "50 / 1" and cells["balanced"][4] == "28.75 (29.50, 28.00)"


def test_verdict_is_on_the_mean_of_paired_gaps(ablation):
    zs, psnr = ablation.gaps(results_over_seeds())
    assert zs == pytest.approx({0: 5.0, 1: -2.0})
    assert psnr == pytest.approx({0: 0.5, 1: 1.0})
    text = ablation.verdict(results_over_seeds())
    # mean zero-shot gap +1.5 <= 2 and PSNR gap +0.75 <= 1, though seed 0 alone misses by 3 points
    assert "+1.5 points behind" in text and "+0.75 dB" in text and "claim holds" in text
    assert "seed 0: +5.0 points, +0.50 dB" in text
    worse = results_over_seeds()
    worse["balanced"][1] = result(0.80, 28.0, 50, 1)
    assert "does NOT hold" in ablation.verdict(worse)


def test_finished_run_is_reused_only_for_the_same_command(ablation, tmp_path):
    out_dir = tmp_path / "balanced_s0"
    overrides = ablation.run_overrides("balanced", 0, out_dir, tmp_path / "data", ["steps=10"])
    assert "seed=0" in overrides and overrides[-1] == "steps=10"  # extra overrides win (last)
    yaml = tmp_path / "stage1.yaml"
    yaml.write_text("steps: 10\n")
    record = ablation.run_record(overrides, yaml)
    assert ablation.finished(out_dir, record) is None  # nothing there
    out_dir.mkdir()
    (out_dir / "metrics.json").write_text(json.dumps(result(0.5, 20.0, 50, 1)))
    assert ablation.finished(out_dir, record) is None  # no record of the command: rerun
    (out_dir / ablation.COMMAND_FILE).write_text(json.dumps(record))
    assert ablation.finished(out_dir, record)["metrics"]["zero_shot_acc"] == 0.5
    other = ablation.run_overrides("balanced", 0, out_dir, tmp_path / "data", ["steps=20"])
    assert ablation.finished(out_dir, ablation.run_record(other, yaml)) is None
    yaml.write_text("steps: 10\nweights: {recon: 30}\n")  # the YAML changed: rerun
    assert ablation.finished(out_dir, ablation.run_record(overrides, yaml)) is None
    (out_dir / "metrics.json").write_text("{truncated")
    assert ablation.finished(out_dir, record) is None


def test_missing_data_is_a_clear_error_and_writes_nothing(ablation, tmp_path, capsys):
    out = tmp_path / "out"
    assert ablation.main(["--data", str(tmp_path / "nowhere"), "--out", str(out)]) == 2
    assert "no ShapesWorld manifest.json" in capsys.readouterr().err
    assert not out.exists()


def test_data_must_be_32px_shapesworld_with_a_text_tokenizer(ablation, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    with pytest.raises(ablation.UserError, match="no ShapesWorld manifest.json"):
        ablation.ensure_data(data, tmp_path / "out")
    (data / "manifest.json").write_text(json.dumps({"image_size": 36}))
    with pytest.raises(ablation.UserError, match="text_tokenizer.model"):
        ablation.ensure_data(data, tmp_path / "out")
    (tmp_path / "text_tokenizer.model").write_bytes(b"x")
    with pytest.raises(ablation.UserError, match="36 px images"):  # the demo's cell data
        ablation.ensure_data(data, tmp_path / "out")
    (data / "manifest.json").write_text(json.dumps({"image_size": 32}))
    assert ablation.ensure_data(data, tmp_path / "out") == data
