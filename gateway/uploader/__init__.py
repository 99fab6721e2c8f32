"""The upload client: scan files into exams, upload them in resumable streams (the technician's
``teleread upload`` and the clinic forwarder)."""
