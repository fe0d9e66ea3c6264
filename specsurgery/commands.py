"""Sub-commands of the later stages: map, plan, apply, verify, check."""
