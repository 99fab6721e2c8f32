"""Triage: ``inference`` runs in the hub (ECG measurements and critical-value rules, the learned
models, fusion, the triage worker); ``training`` is offline (trainers, calibration, evaluation)
and the runtime never imports it. Weights, rules and model cards sit here, beside both."""
