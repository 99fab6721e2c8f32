"""The hub's reading services: routing, the queue and its claims, reports, results, the watch feed."""
