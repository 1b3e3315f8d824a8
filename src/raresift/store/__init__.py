"""Project storage: SQLite database, image registry, label events, vector files."""
