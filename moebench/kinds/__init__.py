"""Kinds of case beyond plain routing: training, expert parallelism, traces."""
