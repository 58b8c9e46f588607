"""Shared base of the project: config schema machinery, errors, atomic file writes, text tokenizer.

Every other package (``tokenizer``, ``unified_mm``, ``train``, ``eval``) may import ``mmcore``;
``mmcore`` imports nothing of ours.
"""
