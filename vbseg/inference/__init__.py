"""How models are fitted: variational Bayes, samplers, exact enumeration for tests."""
