"""Independent computations that the tests compare the project's code against."""
