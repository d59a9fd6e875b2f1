"""delivery stage of Postbode."""
