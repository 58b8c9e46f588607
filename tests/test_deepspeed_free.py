"""The plain-PyTorch pieces of training import without DeepSpeed (the tokenizer sweep needs them
on machines where it is not installed), and the old import locations still re-export them."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_training_pieces_import_without_deepspeed():
    code = ("import sys; sys.modules['deepspeed'] = None\n"
            "import train.optim, train.tokenizer_config, train.tokenizer_loss, train.tokenizer_data\n"
            "import train.checkpoint_dirs\n"
            "import runpy; sys.argv = ['tokenizer_sweep.py', '--list']\n"
            "runpy.run_path('bench/tokenizer_sweep.py', run_name='__main__')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "baseline" in result.stdout


def test_old_locations_reexport_the_moved_names():
    from train import checkpoint_dirs, ds_engine, optim, tokenizer, tokenizer_config, tokenizer_steps
    assert ds_engine.latest_tag is checkpoint_dirs.latest_tag and ds_engine.is_complete is checkpoint_dirs.is_complete
    assert ds_engine.rotate_checkpoints is checkpoint_dirs.rotate_checkpoints
    assert ds_engine.OptimConfig is optim.OptimConfig and ds_engine.EngineConfig is optim.EngineConfig
    assert ds_engine.WarmupCosine is optim.WarmupCosine and ds_engine.param_groups is optim.param_groups
    assert tokenizer.TokenizerTrainConfig is tokenizer_config.TokenizerTrainConfig
    assert tokenizer.BalanceConfig is tokenizer_config.BalanceConfig
    assert tokenizer.lr_prefixes is tokenizer_config.lr_prefixes
    assert tokenizer_steps.LossWeights is tokenizer.LossWeights is tokenizer_config.LossWeights
