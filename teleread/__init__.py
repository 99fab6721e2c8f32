"""teleread: remote ECG and imaging reading network.

This package holds the shared plumbing (settings, errors, logging, object storage, database,
identity, the life cycle, gRPC helpers); ``teleread.app`` is the composition root and the CLI,
and the only plumbing that imports the capabilities. The capabilities live beside it in the
checkout and install under the same namespace, each split by the process it runs in:
``teleread.gateway`` (``clinic``: the clinic gateway; ``uploader``: the upload client;
``hub``: the hub's ingest), ``teleread.reader`` (``hub``: queue, reports and results services;
``clients``: the reader's and hospital's command-line clients), ``teleread.models``
(``inference``: triage at the hub; ``training``: offline trainers and evaluation) and
``teleread.v1`` (the generated gRPC contract).
"""

from pathlib import Path as _Path

__version__ = "0.1.0"

# Imported from a source checkout rather than an installed copy (``python -m pytest`` from the
# repository root puts the checkout's ``teleread/`` first on the path): the capabilities sit beside
# this folder, not in it, so look for them there too. An installed copy has them inside.
_root = _Path(__file__).resolve().parent.parent
if (_root / "pyproject.toml").is_file() and (_root / "gateway" / "__init__.py").is_file():
    __path__.extend([str(_root), str(_root / "proto" / "teleread")])  # type: ignore[name-defined]
del _Path, _root
