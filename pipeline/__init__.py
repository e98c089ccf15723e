"""Everything of the service that runs without Ray: settings, schemas, video sources, Redis protocol."""
