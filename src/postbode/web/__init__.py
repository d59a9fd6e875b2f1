"""web stage of Postbode."""
