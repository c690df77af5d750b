"""Generation: teacher-forced log-probs, the sampling primitives, the static sampler and the
continuous-batching engine."""
