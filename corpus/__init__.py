"""Corpus preparation: text on disk to prepared token streams (python -m corpus.prepare)."""
