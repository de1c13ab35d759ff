"""Evaluation programs: they read files (videos, latents, result JSON), never live model objects.

Each program imports only the library (hiar/), never another program: the code they share lives there,
the rules for their outputs and errors in hiar/outputs.py (tests/test_eval.py checks).
"""
