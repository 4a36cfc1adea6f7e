"""Raw messages are named by a BLAKE3 content hash (see ingest/store.py):
a `content_hash` column, indexed per connection as `sha256` was for the
same job. `sha256` stays, filled in by processing from now on.

0001 creates tables from the current models, so a new database has all of
this already: every step looks first."""
from peewee import CharField

TABLE = "stored_message"


def up(migrator, db):
    columns = {c.name for c in db.get_columns(TABLE)}
    indexes = {i.name for i in db.get_indexes(TABLE)}
    steps = []
    if "content_hash" not in columns:
        # Messages stored before keep "": they are named by their SHA-256,
        # and are never matched by a content hash.
        steps.append(migrator.add_column(TABLE, "content_hash", CharField(max_length=64, default="")))
    for old in ("stored_message_connection_id_sha256", "stored_message_organization_id_sha256"):
        if old in indexes:  # nothing looks messages up by SHA-256 any more
            steps.append(migrator.drop_index(TABLE, old))
    if "stored_message_connection_id_content_hash" not in indexes:
        steps.append(migrator.add_index(TABLE, ("connection_id", "content_hash"), False))
    migrator.migrate(*steps)
