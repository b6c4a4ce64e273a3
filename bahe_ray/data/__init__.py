"""Input tables: schema and validation, streaming readers, MovieLens and synthetic adapters."""
