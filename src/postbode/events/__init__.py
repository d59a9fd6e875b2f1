"""events stage of Postbode."""
