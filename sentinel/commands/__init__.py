"""CLI command groups; each module defines `register(app)` and imports heavy code lazily."""
