"""Evaluation: benchmark files, mean@k / pass@k, generator validity, contamination, plots.

Import the submodules directly (``megatron_sz.evaluation.metrics`` ...); this package's
``__init__`` stays import-light so the curriculum can use the contamination index
without pulling in inference backends.
"""
