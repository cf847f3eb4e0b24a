"""A Django app of the benchmarks' own: the tables a hand-written idempotency guard and a realistic body use."""
