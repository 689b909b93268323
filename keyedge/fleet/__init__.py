"""A fleet of devices, each with its own key, adapter and signed, sealed model, tracked in a database
(SQLAlchemy Core; SQLite by default, PostgreSQL by URL; the schema migrated by Alembic) with the keys in
an encrypted vault. The layer above the workflows: it calls them, it does not re-implement them."""
