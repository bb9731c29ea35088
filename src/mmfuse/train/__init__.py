"""Training on Lightning: the only place that imports it."""
