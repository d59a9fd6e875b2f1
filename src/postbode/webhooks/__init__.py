"""webhooks stage of Postbode."""
