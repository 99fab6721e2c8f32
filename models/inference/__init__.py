"""Triage at the hub: measurements, rules, learned models, fusion and the triage worker."""
