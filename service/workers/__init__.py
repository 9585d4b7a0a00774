"""Where computations run, off the event loop."""
