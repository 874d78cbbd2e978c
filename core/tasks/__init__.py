"""Tasks: what is trained and measured on top of a backbone (retrieval for now)."""
