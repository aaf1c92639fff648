"""Patch retrieval: grid geometry, patch keys, FAISS indexes and the patch database."""
