"""inbound stage of Postbode."""
