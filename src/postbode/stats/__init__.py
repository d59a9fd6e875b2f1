"""stats stage of Postbode."""
