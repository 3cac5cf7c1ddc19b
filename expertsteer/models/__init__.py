"""The language models: the packaged-model zoo, the nnsight-wrapped causal LM (`CausalLM`),
hidden-state capture, token budgets per forward, and GGUF export of steering vectors."""
