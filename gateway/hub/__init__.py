"""The hub's ingest: exams and uploads, staging, validation at the door, clean-up."""
