"""Areas of scripts/bench.py: one module per library area, each with run(args) -> rows."""
