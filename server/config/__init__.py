"""Settings, and where they come from: flags, a YAML config file (reloaded live), the environment."""
