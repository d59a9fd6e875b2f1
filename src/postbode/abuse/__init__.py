"""abuse stage of Postbode."""
