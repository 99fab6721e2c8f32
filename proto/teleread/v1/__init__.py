"""Generated gRPC contract ``teleread.v1`` (regenerate with ``teleread proto gen``)."""
