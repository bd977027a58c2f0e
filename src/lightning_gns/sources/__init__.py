"""Sources of the small- and big-batch gradient norms that the noise scale is estimated from."""
