"""tracking stage of Postbode."""
