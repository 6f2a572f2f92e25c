"""Running changes on units: the run context, THE journaled-change transaction, the engine, fleets, A/B."""
