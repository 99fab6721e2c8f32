"""Triage: ECG measurements and critical-value rules, image priority rules; learned models later."""
