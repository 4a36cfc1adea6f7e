"""Initial schema: organizations, users, connections, drafts, logs.

The first migration creates tables from the current models; every later
migration changes the schema explicitly (add_column etc.), so a database
made by any version reaches the same schema."""
import models


def up(migrator, db):
    db.create_tables(models.ALL_MODELS_V1, safe=True)
