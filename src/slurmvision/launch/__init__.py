"""Login-node commands: launch, status, the demo, and `train --nproc` on this machine."""
