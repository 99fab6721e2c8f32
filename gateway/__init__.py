"""Clinic side and ingest: file scanning and upload client, validation of arriving objects,
and the hub's ingest service."""
