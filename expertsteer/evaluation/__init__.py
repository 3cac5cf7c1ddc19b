"""What steering does, measured against controls: option scoring, calibration and answer
extraction (`scoring`), the random-vector null and threshold-only controls (`controls`),
statistics (`stats`), transfer diagnostics, shared-prefix steered scoring (`branching`), the
report and its plots."""
