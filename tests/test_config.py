"""Config system: _base_ merge, dotted overrides, strict unknown keys with suggestions, types."""
import dataclasses
from typing import Literal, Optional

import pytest
import yaml

from mmcore.config import ConfigError, config_from_dict, config_to_dict, load_config, save_config


@dataclasses.dataclass
class Optim:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.95)
    schedule: Literal["cosine", "constant"] = "cosine"


@dataclasses.dataclass
class Model:
    width: int = 64
    layers: list[int] = dataclasses.field(default_factory=lambda: [1, 2])
    name: Optional[str] = None


@dataclasses.dataclass
class Job:
    steps: int = 10
    flag: bool = False
    optim: Optim = dataclasses.field(default_factory=Optim)
    model: Model = dataclasses.field(default_factory=Model)

    def validate(self):
        if self.steps <= 0:
            raise ConfigError(f"steps must be > 0, got {self.steps}")


def write(path, data):
    path.write_text(yaml.safe_dump(data))
    return path


def test_base_chain_merges_nested_and_overrides_win(tmp_path):
    write(tmp_path / "root.yaml", {"steps": 5, "optim": {"lr": 0.1, "schedule": "constant"}})
    (tmp_path / "sub").mkdir()
    write(tmp_path / "sub" / "mid.yaml", {"_base_": "../root.yaml", "optim": {"lr": 0.2}})
    leaf = write(tmp_path / "leaf.yaml", {"_base_": "sub/mid.yaml", "model": {"width": 32}})
    cfg = load_config(Job, leaf, ["optim.lr=3e-4", "model.layers=[4, 5, 6]", "flag=true"])
    assert cfg.steps == 5
    assert cfg.optim.schedule == "constant"  # from the root, untouched by mid
    assert cfg.optim.lr == pytest.approx(3e-4) and isinstance(cfg.optim.lr, float)  # "3e-4" is a str in YAML
    assert cfg.model.width == 32 and cfg.model.layers == [4, 5, 6] and cfg.flag is True
    assert cfg.optim.betas == (0.9, 0.95)  # schema default


def test_unknown_key_names_path_and_suggests(tmp_path):
    leaf = write(tmp_path / "c.yaml", {"optim": {"lrr": 0.1}})
    with pytest.raises(ConfigError, match=r"optim\.lrr.*did you mean 'lr'"):
        load_config(Job, leaf)
    with pytest.raises(ConfigError, match=r"'modle'.*did you mean 'model'"):
        load_config(Job, None, ["modle.width=3"])


@pytest.mark.parametrize("override, message", [
    ("steps=abc", "steps: expected an integer"),
    ("flag=1", "flag: expected true/false"),
    ("optim.schedule=linear", "not one of 'cosine', 'constant'"),
    ("optim.betas=[0.9]", "expected 2 items"),
    ("model.layers=[1, x]", r"model.layers\[1\]: expected an integer"),
    ("steps=0", "steps must be > 0"),
    ("noequals", "must look like key.sub=value"),
])
def test_bad_values_are_named(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(Job, None, [override])


def test_base_cycle_and_missing_file(tmp_path):
    write(tmp_path / "a.yaml", {"_base_": "b.yaml"})
    write(tmp_path / "b.yaml", {"_base_": "a.yaml"})
    with pytest.raises(ConfigError, match="cycle"):
        load_config(Job, tmp_path / "a.yaml")
    with pytest.raises(ConfigError, match="not found"):
        load_config(Job, tmp_path / "nope.yaml")


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(Job, None, ["model.name=tiny", "optim.lr=0.5"])
    path = save_config(cfg, tmp_path / "run" / "config.yaml")
    again = load_config(Job, path)
    assert again == cfg
    assert config_from_dict(Job, config_to_dict(cfg)) == cfg
