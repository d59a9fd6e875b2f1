"""privacy stage of Postbode."""
