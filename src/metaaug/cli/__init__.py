"""Command-line interface (`metaaug ...`)."""
