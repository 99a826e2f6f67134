"""Plain-PyTorch references: the test oracle, the fallback backend, and the eager baseline of each op."""
