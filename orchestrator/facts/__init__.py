"""Facts: read-only probes of a unit, one module per topic. Each fact is a command plus a pure parser tested
on recorded output; changes read a unit's state only through them."""
