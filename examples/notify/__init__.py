"""The clustered notification service: simulated push providers, intake, dispatchers, campaigns."""
