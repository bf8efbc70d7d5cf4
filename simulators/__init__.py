"""Stand-ins for a real shop where none exists: a search engine over a real catalog, shoppers and a judge."""
