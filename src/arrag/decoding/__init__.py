"""Decoding: pure sampling and merge functions, and the one generation loop."""
