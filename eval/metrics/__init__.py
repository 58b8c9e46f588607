"""Metric functions of the evaluation harness, pure and separately importable.

* :mod:`eval.metrics.vqa` — VQAv2 answer normalisation and soft accuracy, exact match (GQA style),
  yes/no accuracy, precision, recall and F1 (POPE style);
* :mod:`eval.metrics.caption` — COCO-toolkit BLEU-1..4 and CIDEr-D;
* :mod:`eval.metrics.image` — PSNR, SSIM, FID from a user-supplied feature network;
* :mod:`eval.metrics.geneval` — compositional text-to-image accuracy on ShapesWorld, judged by the
  pixel analyser.

Nothing is imported here, so ``eval.metrics.vqa`` and ``eval.metrics.caption`` load without torch.
"""
