"""Batched evaluation and metrics as pure tensor functions (know no method)."""
