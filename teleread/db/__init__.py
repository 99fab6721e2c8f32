"""Metadata database: SQLAlchemy 2 schema, engine set-up and Alembic migrations."""
