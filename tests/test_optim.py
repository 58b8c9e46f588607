"""train.optim: parameter groups and the Muon + AdamW optimizer (CPU, tiny)."""
import copy

import pytest
import torch

from mmcore.config import ConfigError
from train.optim import Muon, MuonAdamW, OptimConfig, build_optimizer, build_scheduler, newton_schulz, param_groups


class TwoLayers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(10, 8)
        self.layers = torch.nn.ModuleList([torch.nn.Linear(8, 8), torch.nn.Linear(8, 16)])
        self.norm = torch.nn.LayerNorm(16)
        self.head = torch.nn.Linear(16, 10, bias=False)

    def forward(self, ids):
        hidden = self.embed(ids)
        for layer in self.layers:
            hidden = torch.tanh(layer(hidden))
        return self.head(self.norm(hidden))


def loss_of(model, seed):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 10, (4, 5), generator=generator)
    return torch.nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.flatten())


def muon_config(**kw):
    return OptimConfig(**{"lr": 1e-2, "name": "muon", "muon_params": ("layers.*",), "warmup_steps": 2,
                          "total_steps": 10, **kw})


def test_muon_groups_hold_exactly_the_matching_matrices():
    model = TwoLayers()
    groups = param_groups(model, 0.1, 1e-3, muon_params=("layers.*",))
    muon = {id(p) for g in groups if g["use_muon"] for p in g["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in muon}
    assert names == {"layers.0.weight", "layers.1.weight"}  # biases are 1-D: AdamW
    assert all(g["weight_decay"] == 0.1 for g in groups if g["use_muon"])
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    # without patterns the groups carry no flag (the plain AdamW path is unchanged)
    assert all("use_muon" not in g for g in param_groups(model, 0.1, 1e-3))


def test_muon_patterns_that_match_nothing_are_an_error():
    with pytest.raises(ConfigError, match="match no trainable"):
        param_groups(TwoLayers(), 0.1, 1e-3, muon_params=("model.layers.*",))
    with pytest.raises(ConfigError, match="muon_params is empty"):
        OptimConfig(name="muon").validate()


def test_one_step_equals_muon_and_adamw_stepped_separately():
    """With bf16 Newton-Schulz (torch's only precision) the steps equal torch.optim.Muon's exactly."""
    torch.manual_seed(0)
    model = TwoLayers()
    reference = copy.deepcopy(model)
    initial = copy.deepcopy(model.state_dict())
    optimizer = build_optimizer(model, muon_config(muon_ns_dtype="bfloat16"))
    assert isinstance(optimizer, MuonAdamW)
    matrices = [reference.layers[0].weight, reference.layers[1].weight]
    rest = [p for p in reference.parameters() if all(p is not m for m in matrices)]
    muon = torch.optim.Muon(matrices, lr=1e-2, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    adamw = torch.optim.AdamW([{"params": [reference.embed.weight, reference.head.weight], "weight_decay": 0.1},
                               {"params": [p for p in rest if p.ndim < 2], "weight_decay": 0.0}],
                              lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    for step in range(3):
        loss_of(model, step).backward()
        optimizer.step()
        optimizer.zero_grad()
        loss_of(reference, step).backward()
        muon.step()
        adamw.step()
        muon.zero_grad()
        adamw.zero_grad()
    for (name, got), want in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=name)
    assert not torch.equal(model.layers[0].weight, initial["layers.0.weight"])  # the steps did move it


def test_float32_newton_schulz_is_closer_to_exact_than_bf16():
    torch.manual_seed(0)
    update = torch.randn(16, 40)
    args = ((3.4445, -4.7750, 2.0315), 5, 1e-7)
    exact = newton_schulz(update.double(), *args, torch.float64)
    fp32, bf16 = newton_schulz(update, *args, torch.float32), newton_schulz(update, *args, torch.bfloat16)
    assert fp32.dtype == torch.float32 and bf16.dtype == torch.bfloat16 and fp32.shape == (16, 40)
    fp32_error, bf16_error = (fp32.double() - exact).abs().max(), (bf16.double() - exact).abs().max()
    assert fp32_error < 1e-5 < bf16_error / 100
    # what the iteration is for: singular values pulled from their spread towards 1 (torch's
    # coefficients leave them in roughly [0.5, 1.5], not exactly 1)
    before, after = torch.linalg.svdvals(update), torch.linalg.svdvals(fp32)
    assert before.max() / before.min() > 3 and 0.3 < after.min() and after.max() < 1.6
    tall = newton_schulz(update.T.contiguous(), *args, torch.float32)  # rows > cols: transposed inside
    torch.testing.assert_close(tall, fp32.T)


def test_auto_precision_is_float32_on_cpus_without_bf16_units_and_the_state_loads_into_torch_muon(monkeypatch):
    torch.manual_seed(0)
    model = TwoLayers()
    for amx, dtype in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr("train.optim.cpu_has_amx_bf16", lambda amx=amx: amx)
        optimizer = build_optimizer(model, muon_config())
        assert optimizer._muon.ns_dtype_for(model.layers[0].weight) == dtype
    auto = copy.deepcopy(model)
    bf16 = copy.deepcopy(model)
    steps = [(auto, build_optimizer(auto, muon_config(muon_ns_dtype="float32"))),
             (bf16, build_optimizer(bf16, muon_config(muon_ns_dtype="bfloat16")))]
    for net, opt in steps:
        loss_of(net, 0).backward()
        opt.step()
    diff = (auto.layers[0].weight - bf16.layers[0].weight).abs().max()
    assert 0 < diff < 1e-3  # the same step up to bf16's rounding
    # checkpoints: a state saved by ours continues in torch's (and back) with the same steps
    ours_net, torch_net = copy.deepcopy(model), copy.deepcopy(model)
    ours = Muon(list(ours_net.layers.parameters())[::2], ns_dtype="bfloat16", lr=1e-2)
    loss_of(ours_net, 0).backward()
    ours.step()
    torch_net.load_state_dict(ours_net.state_dict())
    theirs = torch.optim.Muon(list(torch_net.layers.parameters())[::2], lr=1e-2, adjust_lr_fn="match_rms_adamw")
    theirs.load_state_dict(copy.deepcopy(ours.state_dict()))  # as from a file: no shared buffers
    for net, opt in ((ours_net, ours), (torch_net, theirs)):
        net.zero_grad()
        loss_of(net, 1).backward()
        opt.step()
    torch.testing.assert_close(ours_net.layers[1].weight, torch_net.layers[1].weight, rtol=0, atol=0)
    with pytest.raises(ConfigError, match="muon_ns_dtype"):
        muon_config(muon_ns_dtype="float16").validate()


def test_schedule_reaches_both_halves_and_resume_equals_continuous():
    cfg = muon_config()
    torch.manual_seed(0)
    model = TwoLayers()
    resumed_model = copy.deepcopy(model)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg)
    for step in range(3):
        loss_of(model, step).backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
    # the schedule's lr is what each inner optimizer reads
    assert optimizer._muon.param_groups[0]["lr"] == optimizer._adam.param_groups[0]["lr"] == scheduler.get_last_lr()[0]
    saved = copy.deepcopy((model.state_dict(), optimizer.state_dict(), scheduler.state_dict()))
    for step in range(3, 6):
        loss_of(model, step).backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()

    resumed_model.load_state_dict(saved[0])
    optimizer2 = build_optimizer(resumed_model, cfg)
    scheduler2 = build_scheduler(optimizer2, cfg)
    optimizer2.load_state_dict(saved[1])
    scheduler2.load_state_dict(saved[2])
    assert optimizer2._muon.state is optimizer2.state  # relinked after loading
    momentum = optimizer2.state[resumed_model.layers[0].weight]["momentum_buffer"]
    assert momentum.abs().sum() > 0  # Muon's momentum came back, not a fresh zero buffer
    for step in range(3, 6):
        loss_of(resumed_model, step).backward()
        optimizer2.step()
        optimizer2.zero_grad()
        scheduler2.step()
    for (name, got), want in zip(resumed_model.named_parameters(), model.parameters()):
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=name)


def test_a_step_with_non_finite_gradients_is_skipped_and_flagged():
    torch.manual_seed(0)
    model = TwoLayers()
    optimizer = build_optimizer(model, muon_config())
    before = copy.deepcopy(model.state_dict())
    (loss_of(model, 0) * float("nan")).backward()
    optimizer.step()
    assert optimizer.overflow  # DeepSpeed's engine reads this: step not applied, schedule held
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not optimizer.state  # no momentum or Adam moments were started
    optimizer.zero_grad()
    loss_of(model, 1).backward()
    optimizer.step()
    assert not optimizer.overflow
    assert not torch.equal(before["layers.0.weight"], model.layers[0].weight)


@pytest.mark.parametrize("name, stage, bf16, message", [
    ("muon", 2, False, "needs ZeRO stage 0 in fp32"), ("muon", 0, True, "with bf16"),
    ("adamw", 0, False, "stage 0, which is for optim.name=muon")])
def test_optimizer_and_zero_stage_mismatches_are_config_errors(name, stage, bf16, message):
    from train.ds_engine import check_optimizer_fits
    cfg = muon_config() if name == "muon" else OptimConfig()
    ds_config = {"zero_optimization": {"stage": stage}, "bf16": {"enabled": bf16}}
    with pytest.raises(ConfigError, match=message):
        check_optimizer_fits(cfg, ds_config, "zero.json")


def test_the_fitting_optimizer_and_zero_stage_pairs_pass():
    from train.ds_engine import check_optimizer_fits
    check_optimizer_fits(muon_config(), {"zero_optimization": {"stage": 0}}, "zero0.json")
    check_optimizer_fits(OptimConfig(), {"zero_optimization": {"stage": 2}}, "zero2.json")
