"""HTTP routes: the OpenAI API, the admin API, and what they share."""
