"""QLIP visual tokenizer: a ViT encoder whose patch features are projected to a few dimensions,
L2-normalised and quantized with Binary Spherical Quantization (:mod:`tokenizer.bsq`) into an
implicit codebook of ``2**L`` binary codes, plus a pixel decoder and a text encoder so that the
discrete tokens are trained for both reconstruction and image-text alignment (QLIP, NVlabs 2025;
BSQ, Zhao et al. 2024). Plain single-device PyTorch; it imports nothing from the rest of the repo
except :mod:`mmcore`.
"""
