"""The clinic gateway (``teleread gateway run``): DICOM receiver, watch folder, durable outbox,
forwarder to the hub, and the clinic's results."""
