"""Reading: ``hub`` holds the hub's routing, queue (claims as leases), reports, results and watch
feed services; ``clients`` the reader's (``teleread read``) and hospital's (``teleread results``)
command-line clients."""
