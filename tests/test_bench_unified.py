"""bench/bench_unified.py: its two loss paths score the same loss (the MFU rows compare like with like)."""
import torch

from unified_mm.model import UnifiedModelConfig, build_model
from unified_mm.vocab import Vocab

from tests.script_env import load_script

bench_unified = load_script("bench/bench_unified.py", "bench_unified")


def test_hidden_and_logits_paths_give_the_same_loss_and_gradients():
    torch.manual_seed(0)
    vocab = Vocab.for_tokenizers(*bench_unified.VOCABS["shapesworld"])
    model = build_model(UnifiedModelConfig(preset="tiny"), vocab)
    ids = torch.randint(0, vocab.size, (2, 24))
    off = torch.autocast("cpu", enabled=False)
    results = {}
    for path in ("logits", "hidden"):
        model.zero_grad(set_to_none=True)
        loss = bench_unified.step_loss(model, ids, vocab, off, path)
        loss.backward()
        results[path] = (loss.detach(), model.lm_head.weight.grad.clone())
    assert torch.isfinite(results["logits"][0])
    torch.testing.assert_close(results["hidden"][0], results["logits"][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(results["hidden"][1], results["logits"][1], rtol=1e-4, atol=1e-6)
