"""Step-time benchmarks of imtl_func against equal weighting and plain IMTL loops (issue 4).

Run ``python -m benchmarks.step --help``.
"""
