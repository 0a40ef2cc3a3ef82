"""Comparing runs: verdicts per metric, the sides of a comparison, exports."""
