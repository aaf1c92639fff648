"""Runners for the paper's benchmarks, for any backend: GenEval, DPG-Bench, and FID/KID of image folders.

The runners only generate, in each benchmark's official layout; scoring is the benchmarks' own code
(GenEval's object detector, DPG-Bench's VQA model), which needs their models and a GPU.
"""
