"""Alembic's environment for the fleet database: runs the migrations on the connection keyedge passes in
(``config.attributes["connection"]``), in that connection's transaction."""

from alembic import context

from keyedge.fleet.schema import metadata

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
