"""store stage of Postbode."""
