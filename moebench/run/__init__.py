"""Running a suite: the run loop, measuring one case, timing, threads, isolation, capture."""
