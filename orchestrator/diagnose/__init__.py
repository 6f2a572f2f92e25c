"""`tune diagnose`: the diagnosis window, tracing, kernel state, and one function per finding."""
