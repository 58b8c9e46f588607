"""Training entry points and their distributed plumbing.

Everything that touches DeepSpeed lives in this package (``train.distributed`` for process-group
setup, ``train.ds_engine`` for engines, checkpoints and consolidation); model and data code
elsewhere stays importable without it. Scripts here are launched by ``deepspeed`` or ``torchrun``
and also run as a single process without any launcher.
"""
