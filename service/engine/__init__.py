"""Pure torch: specs to modules, forward / backward / update, the trace. No HTTP, no storage."""
