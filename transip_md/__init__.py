"""transip-md: TransIP inter-atomic potentials for production molecular dynamics."""

__version__ = "0.1.0"
