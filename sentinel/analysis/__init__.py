"""Analysis of sampled traffic, off the request path (drift, accuracy estimate, shadow agreement)."""
