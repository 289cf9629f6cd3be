"""paramserve.client: the SDK workers and admins use to talk to a paramserve daemon."""
