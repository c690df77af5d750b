"""Training: the run's setup, the pure jitted update, rollouts, the trainer loop, checkpoints, the run
directory and log, influence views, the SFT warm start, and the memory planner."""
