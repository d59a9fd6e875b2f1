"""bounces stage of Postbode."""
