"""Schema migrations: a database made by an earlier release reaches today's
schema, and keeps what it held. On a file of its own (SQLite), whatever
database the rest of the suite uses."""
from __future__ import annotations

from peewee import SqliteDatabase
from playhouse import migrations

from services.database import MIGRATIONS_DIR

TABLE = "stored_message"


def _migrate(database) -> list[str]:
    import models

    # The models are bound to the app's database; bound to this one meanwhile.
    with database.bind_ctx(models.ALL_MODELS), database.connection_context():
        return migrations.run(database, str(MIGRATIONS_DIR)) or []


def _indexes(database) -> dict[str, list[str]]:
    with database.connection_context():
        return {i.name: i.columns for i in database.get_indexes(TABLE)}


def _as_before_content_hash(database) -> None:
    """Today's database turned back into what releases before 2026-11 made:
    no content_hash, messages looked up by (connection, sha256)."""
    with database.connection_context():
        database.execute_sql(f'DROP INDEX "{TABLE}_connection_id_content_hash"')
        database.execute_sql(f'ALTER TABLE "{TABLE}" DROP COLUMN "content_hash"')
        database.execute_sql(f'CREATE INDEX "{TABLE}_connection_id_sha256" ON "{TABLE}" ("connection_id", "sha256")')
        database.execute_sql(f'CREATE INDEX "{TABLE}_organization_id_sha256" ON "{TABLE}" ("organization_id", "sha256")')
        database.execute_sql("DELETE FROM schema_migration WHERE name = '0002_content_hash'")
        database.execute_sql("INSERT INTO organization (name, created_at) VALUES ('Acme', '2026-10-01 00:00:00')")
        database.execute_sql(
            f'INSERT INTO "{TABLE}" (organization_id, connection_name, sha256, size, path, captured_at, received_at, '
            "state, attempts, error, message_id, in_reply_to, \"references\", subject, from_addr, to_addrs, date, "
            "text_body, html_body, headers_json, evidence_json, defects, route) VALUES "
            "(1, 'Old', ?, 10, ?, '2026-10-01 00:00:00', '', 'processed', 1, '', '<old@x>', '', '', 'Old mail', "
            "'', '', '', '', '', '[]', '', '', 'inbox')", ["a" * 64, f"raw/aa/aa/{'a' * 64}.eml"])


def test_a_new_database_gets_every_migration_and_a_second_run_changes_nothing(tmp_path):
    database = SqliteDatabase(str(tmp_path / "new.db"))
    assert _migrate(database) == ["0001_initial", "0002_content_hash"]
    assert _indexes(database)[f"{TABLE}_connection_id_content_hash"] == ["connection_id", "content_hash"]
    assert _migrate(database) == []


def test_a_database_from_before_content_hash_is_upgraded_and_keeps_its_messages(tmp_path):
    database = SqliteDatabase(str(tmp_path / "old.db"))
    _migrate(database)
    _as_before_content_hash(database)

    assert _migrate(database) == ["0002_content_hash"]

    indexes = _indexes(database)
    assert indexes[f"{TABLE}_connection_id_content_hash"] == ["connection_id", "content_hash"]
    assert not [name for name in indexes if name.endswith("_sha256")]
    with database.connection_context():
        row = database.execute_sql(f'SELECT sha256, content_hash, path, subject FROM "{TABLE}"').fetchall()
    # Named by its SHA-256 where it was stored; never matched by a content hash.
    assert row == [("a" * 64, "", f"raw/aa/aa/{'a' * 64}.eml", "Old mail")]
