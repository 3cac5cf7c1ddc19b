"""LightningDataModules, one file per data source (benchmarks, paired activations)."""
