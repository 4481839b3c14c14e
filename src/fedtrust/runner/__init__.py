"""Running jobs: config schema, run directory, checkpoints, callbacks."""
