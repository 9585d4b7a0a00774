"""HTTP: validation at the edge, problem+json for every error, offline docs."""
