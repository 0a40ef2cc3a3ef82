"""Types and pure algorithms every stage shares (imports no other moebench folder)."""
