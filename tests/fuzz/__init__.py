"""Fuzz targets of the C++ runtime's parsers, their driver and seed corpus (see make_corpus.py)."""
