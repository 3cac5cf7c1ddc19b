"""What steering does, measured against controls: option scoring (`options`), calibration
(`calibration`), generation and answer extraction (`answers`), evaluation of a decoder on task
examples (`evaluate`), the random-vector null and threshold-only controls (`controls`),
statistics (`stats`), transfer diagnostics, shared-prefix steered scoring (`branching`), the
report and its plots."""
