"""Evaluation harness: zero-shot, reconstruction, VQA, captioning and text-to-image metrics (issue 6).

Imports ``tokenizer`` and ``unified_mm``; nothing imports ``eval``.
"""
