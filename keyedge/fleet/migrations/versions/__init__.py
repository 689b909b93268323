"""The fleet schema's revisions, oldest first."""
