"""Command-line clients of the hub's reading and results APIs."""
