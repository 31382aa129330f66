"""The signaler: reads regret summaries from Redis streams, solves the correlated-equilibrium
linear program, and publishes signed private routing recommendations."""
