"""webhooks formats stage of Postbode."""
