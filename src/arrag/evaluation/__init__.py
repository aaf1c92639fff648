"""Measuring AR-RAG on the built-in world: the experiment, its statistics and its report."""
