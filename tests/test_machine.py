"""mmcore.machine: the CPU description reports print beside budgeted figures."""
from mmcore import machine

CPUINFO = ("processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R)  Processor @ 2.00GHz\n"
           "flags\t\t: fpu avx2 avx512f\n\nprocessor\t: 1\nmodel name\t: Intel(R) Xeon(R)  Processor @ 2.00GHz\n")


def test_model_name_and_flags_come_from_cpuinfo(monkeypatch, tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text(CPUINFO)
    monkeypatch.setattr(machine, "CPUINFO", str(path))
    monkeypatch.setattr(machine.os, "cpu_count", lambda: 2)
    facts = machine.describe()
    assert facts == {"cpu": "Intel(R) Xeon(R) Processor @ 2.00GHz", "cpus": 2, "amx_bf16": False}
    assert machine.describe_text(facts) == "Intel(R) Xeon(R) Processor @ 2.00GHz, 2 CPUs, no AMX-BF16"
    path.write_text(CPUINFO.replace("avx512f", "avx512f amx_tile amx_bf16"))
    with_gpu = machine.describe("NVIDIA H200")
    assert with_gpu["amx_bf16"] and with_gpu["gpu"] == "NVIDIA H200"
    assert machine.describe_text(with_gpu).endswith("AMX-BF16, GPU NVIDIA H200")


def test_no_cpuinfo_falls_back(monkeypatch, tmp_path):
    monkeypatch.setattr(machine, "CPUINFO", str(tmp_path / "absent"))
    monkeypatch.setattr(machine.platform, "processor", lambda: "")
    assert machine.cpu_model() == "unknown CPU"
    assert machine.cpu_has_amx_bf16() is False
