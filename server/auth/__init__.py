"""Who may call what: API keys and their scopes, and the network addresses the rules need."""
