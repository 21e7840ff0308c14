"""Data preparation, training and evaluation of captioner models."""
