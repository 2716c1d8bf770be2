"""One module per provider, each over the provider's official SDK."""
