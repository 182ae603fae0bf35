"""Datasets that ship inside the package (see README.md here): `digits`."""
