"""Running it: experiment configs and their stages (`experiment`), and the command line
(`cli`), which calls the pipeline; nothing here imports the CLI."""
