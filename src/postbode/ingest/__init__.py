"""ingest stage of Postbode."""
