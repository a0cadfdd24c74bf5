"""Entropy coding: ``entropy`` is the only module that imports the entropy-coder library."""
