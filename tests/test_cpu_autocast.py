"""engine.cpu_autocast: which dtype the unified trainer's forward autocasts to, and where."""
import pytest
import torch

from mmcore.config import ConfigError, config_from_dict
from train import optim
from train.optim import EngineConfig, cpu_autocast_dtype


@pytest.mark.parametrize("has_amx", [False, True])
def test_autocast_follows_the_setting_and_auto_follows_amx(monkeypatch, has_amx):
    monkeypatch.setattr(optim, "cpu_has_amx_bf16", lambda: has_amx)
    assert cpu_autocast_dtype(EngineConfig(cpu_autocast="none"), torch.device("cpu")) is None
    assert cpu_autocast_dtype(EngineConfig(cpu_autocast="bf16"), "cpu") is torch.bfloat16
    expected = torch.bfloat16 if has_amx else None
    assert cpu_autocast_dtype(EngineConfig(cpu_autocast="auto"), torch.device("cpu")) is expected
    # never on an accelerator: there precision (bf16 via DeepSpeed) decides
    assert cpu_autocast_dtype(EngineConfig(cpu_autocast="bf16"), torch.device("cuda")) is None


def test_amx_detection_reads_cpuinfo_flags(monkeypatch, tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    real_open = open

    def fake_open(path, *args, **kwargs):
        return real_open(cpuinfo if path == "/proc/cpuinfo" else path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", fake_open)
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f amx_tile amx_bf16\n")
    assert optim.cpu_has_amx_bf16()
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16\n")  # bf16 ISA, no AMX tiles
    assert not optim.cpu_has_amx_bf16()
    cpuinfo.unlink()
    assert not optim.cpu_has_amx_bf16()


def test_unknown_setting_is_a_config_error():
    """The config schema's Literal check names the field and the allowed values."""
    with pytest.raises(ConfigError, match="cpu_autocast: 'fp8' is not one of 'none', 'bf16', 'auto'"):
        config_from_dict(EngineConfig, {"cpu_autocast": "fp8"})
