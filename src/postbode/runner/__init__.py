"""Queue runners and periodic duties: one loop that drains any leased queue, and tasks that run
once per period across every process and node."""
