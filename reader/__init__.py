"""Reading side: routing and the reading queue (claims as leases), reports, results."""
