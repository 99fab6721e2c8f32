"""Offline: training, calibration and evaluation of the triage models (never imported at run time)."""
