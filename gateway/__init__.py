"""Objects on their way in: ``clinic`` runs at the clinic (DICOM receiver, watch folder, outbox,
forwarder, results), ``uploader`` is the upload client (the technician's CLI and the clinic
forwarder's uploader), ``hub`` runs in the hub (ingest, staging, clean-up). ``validate`` is the
check every door applies, at the clinic and at the hub."""
