"""LightningModules, one file per stage: thin orchestration over `expertsteer`."""
