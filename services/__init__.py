"""Process-level services shared by web, worker and scheduler: crypto,
database, Redis, logging. Nothing here knows about HTTP views."""
