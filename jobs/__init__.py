"""RQ jobs. Each takes ids (never objects or secrets), opens its own
database connection and records what happened."""
