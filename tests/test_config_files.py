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
# by the first part of the path under configs/: a folder, or a file at the top level
SCHEMAS = {"data": ShapesWorldConfig, "smoke": SmokeConfig, "tokenizer": TokenizerTrainConfig,
           "unified": UnifiedTrainConfig, "text_tokenizer.yaml": TextTokenizerConfig}
SHIPPED = sorted(CONFIGS.rglob("*.yaml"))


def _schema(path: Path):
    return SCHEMAS.get(path.relative_to(CONFIGS).parts[0])


def test_every_config_has_a_schema():
    assert SHIPPED
    unknown = [str(p) for p in SHIPPED if _schema(p) is None]
    assert not unknown, f"no schema for {unknown}: add its folder to SCHEMAS"


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_shipped_config_loads_strictly(path):
    schema = _schema(path)
    assert isinstance(load_config(schema, path), schema)  # load_config validates: bad keys/values raise
