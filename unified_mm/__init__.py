"""Unified multimodal model: QLIP-style visual tokenizer + one Llama decoder (VQA, captions, text-to-image)."""
