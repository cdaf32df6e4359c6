"""tuners stage."""
