"""HiAR: hierarchical (step-first) denoising for autoregressive long video generation.

The importable library. Programs (inference.py, train/, eval/) parse arguments and call into it.
Importing it touches no CUDA-only code.
"""

__version__ = "0.1.0"
