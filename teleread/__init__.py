"""teleread: remote ECG and imaging reading network.

This package holds the shared plumbing (settings, errors, logging, object storage, database,
identity, gRPC helpers and the CLI). The capabilities live beside it and install under the same
namespace: ``teleread.gateway`` (ingest), ``teleread.reader`` (reading queue, reports, results),
``teleread.models`` (triage) and ``teleread.v1`` (the generated gRPC contract).
"""

__version__ = "0.1.0"
