"""Readers and converters for checkpoints and files from other frameworks (PyTorch, Hugging Face)."""
