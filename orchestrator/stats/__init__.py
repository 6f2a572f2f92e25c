"""Statistics: the keep/rollback decision and A/B analysis. Pure: no YAML, no HTML, no unit."""
