"""The composition root (``build_hub``) and the command line: the only plumbing that imports the
capability packages."""
