"""Changes: one contract for every kind (read through facts, plan a diff, apply, verify, roll back byte for byte),
one module per kind, and the registry that builds a change from a profile entry."""
