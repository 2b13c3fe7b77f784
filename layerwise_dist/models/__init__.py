"""Teacher loading, tiny test models and student construction."""
