"""ExpertSteer: steer a target LLM with steering vectors derived from an expert model.

The algorithms live here as plain torch functions and small classes, importable without
Lightning. The package follows the method: `models`, `data`, `method` (the four steps), `evaluation`
and `pipeline`; see README.md.
"""

__version__ = "0.1.0"
