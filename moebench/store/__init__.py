"""Run folders on disk: durable JSON lines, metadata, one writer per folder (no torch, no pandas)."""
