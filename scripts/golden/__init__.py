"""Parts of make_golden.py: one module per library area, each with make(root)."""
