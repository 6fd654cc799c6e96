"""Orchestration: config schema, runner, checkpoints, tracking and the CLI."""
