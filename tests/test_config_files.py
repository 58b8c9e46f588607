"""Every YAML config the repository ships loads strictly into its schema (unknown keys, bad
values and broken ``_base_`` chains are errors), so a config cannot rot unnoticed between demos."""
from pathlib import Path

import pytest

from mmcore.config import load_config
from train.lm_smoke import SmokeConfig
from train.text_tokenizer import TextTokenizerConfig
from train.tokenizer_config import TokenizerTrainConfig
from train.unified import UnifiedTrainConfig
from unified_mm.data.shapesworld import ShapesWorldConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SCHEMAS = {"data": ShapesWorldConfig, "smoke": SmokeConfig, "tokenizer": TokenizerTrainConfig,
           "unified": UnifiedTrainConfig}


def _schema(path: Path):
    relative = path.relative_to(CONFIGS)
    if relative.parts == ("text_tokenizer.yaml",):
        return TextTokenizerConfig
    return SCHEMAS[relative.parts[0]]


SHIPPED = sorted(CONFIGS.rglob("*.yaml"))


def test_every_config_folder_has_a_schema():
    assert SHIPPED
    unknown = [str(p) for p in SHIPPED if p.relative_to(CONFIGS).parts[0] not in SCHEMAS
               and p.name != "text_tokenizer.yaml"]
    assert not unknown, f"no schema for {unknown}: add the folder to SCHEMAS"


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_shipped_config_loads_strictly(path):
    cfg = load_config(_schema(path), path)
    if hasattr(cfg, "validate"):
        cfg.validate()
