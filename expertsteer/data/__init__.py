"""Tasks and the activations read from them: task files and the built-in task catalogue,
generated tasks, steer/dev/test splits, prompts, the sequence-level activation store and the
token-level paired corpus."""
