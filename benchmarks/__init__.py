"""Benchmarks: the 2B train step and sampling against the diffusers peer (``python benchmarks/run_all.py``)."""
