"""Everything of the service that runs without Ray: settings, schemas, video sources, Redis protocol."""

import os

# Checkpoints are local folders written by save_pretrained: nothing may reach for a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
