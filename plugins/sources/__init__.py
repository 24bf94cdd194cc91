"""Model and data sources."""
