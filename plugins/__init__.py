"""Built-in sparsify plugins (import name ``sparsify_plugins``)."""
