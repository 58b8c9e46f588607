"""Muon's Newton-Schulz work split across data-parallel ranks (train.optim.Muon ``split``): the
same updates bit for bit as one rank doing all of it, each rank orthogonalising only its share."""
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from train.optim import Muon, OptimConfig, SplitRanks, build_optimizer, split_owners

STEPS = 3


class Stack(torch.nn.Module):
    """Matrices of several shapes (wide, tall, square) so the split has something to balance."""

    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList([torch.nn.Linear(8, 24), torch.nn.Linear(24, 8),
                                           torch.nn.Linear(8, 8), torch.nn.Linear(8, 16, bias=False),
                                           torch.nn.Linear(16, 8)])
        self.embed = torch.nn.Embedding(10, 8)

    def forward(self, ids):
        hidden = self.embed(ids)
        for layer in self.layers:
            hidden = torch.tanh(layer(hidden))
        return hidden


def config():
    return OptimConfig(lr=1e-2, name="muon", muon_params=("layers.*",), muon_ns_dtype="float32")


def train(model, optimizer):
    for step in range(STEPS):
        ids = torch.randint(0, 10, (4, 5), generator=torch.Generator().manual_seed(step))
        optimizer.zero_grad()
        model(ids).square().mean().backward()  # every rank the same gradients, as after DP averaging
        optimizer.step()


def _worker(rank, world_size, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    torch.manual_seed(0)
    model = Stack()
    optimizer = build_optimizer(model, config(), split=SplitRanks(rank, world_size, dist.all_reduce))
    done = []
    orthogonalise = optimizer._muon.orthogonalise
    optimizer._muon.orthogonalise = lambda group, param, update: done.append(param.shape) or orthogonalise(
        group, param, update)
    train(model, optimizer)
    torch.save({"params": dict(model.state_dict()), "momentum": [optimizer.state[p]["momentum_buffer"]
                                                                for p in model.layers.parameters() if p.ndim == 2],
                "orthogonalised": done}, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def test_split_ranks_step_exactly_like_one_rank_and_share_the_work(tmp_path):
    world_size = 2
    # spawn, not fork: a forked child inherits the default process group an earlier test in this
    # pytest process may have left initialised (CI failed so), and cannot initialise its own
    mp.spawn(_worker, args=(world_size, str(tmp_path / "init"), str(tmp_path)), nprocs=world_size)
    torch.manual_seed(0)
    model = Stack()
    optimizer = build_optimizer(model, config())  # no split: one rank orthogonalises everything
    assert optimizer._muon.split is None
    train(model, optimizer)
    reference = model.state_dict()
    momentum = [optimizer.state[p]["momentum_buffer"] for p in model.layers.parameters() if p.ndim == 2]
    shares = []
    for rank in range(world_size):
        result = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for name, value in reference.items():
            assert torch.equal(result["params"][name], value), (rank, name)
        assert all(torch.equal(a, b) for a, b in zip(result["momentum"], momentum))  # whole state on every rank
        shares.append(result["orthogonalised"])
    matrices = [p.shape for p in model.layers.parameters() if p.ndim == 2]
    assert all(shares) and sorted(shares[0] + shares[1]) == sorted(matrices * STEPS)  # each once per step


def test_owners_balance_the_cost_and_agree_on_every_call():
    shapes = [torch.Size(s) for s in [(128, 128)] * 4 + [(384, 128)] * 4 + [(512, 128)] * 4]
    owners = split_owners(shapes, 2)
    assert owners == split_owners(shapes, 2)  # deterministic: every rank derives the same split
    loads = [sum(s[0] * s[1] * min(s) for s, o in zip(shapes, owners) if o == rank) for rank in range(2)]
    assert loads[0] == loads[1]
    assert split_owners(shapes, 1) == [0] * len(shapes)
    assert sorted(set(split_owners(shapes[:3], 4))) == [0, 1, 2]  # fewer matrices than ranks: some idle


def test_one_rank_means_no_split():
    matrix = torch.nn.Parameter(torch.randn(4, 4))
    assert Muon([matrix], split=SplitRanks(0, 1, lambda t: None)).split is None
