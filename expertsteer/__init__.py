"""ExpertSteer: steer a target LLM with steering vectors derived from an expert model.

The algorithms live here as plain torch functions and small classes, importable without
Lightning. See README.md for the pipeline and SPEC defaults.
"""

__version__ = "0.1.0"
