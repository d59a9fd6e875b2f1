"""testing stage of Postbode."""
