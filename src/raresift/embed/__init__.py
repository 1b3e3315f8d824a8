"""Embedding photos with a pretrained model: decoding, models, the resumable pipeline."""
